"""fastbert: a fast, exact BERT training engine.

The models, config and tokenizer are importable from here; the rest lives in submodules (``fastbert.ops``,
``fastbert.hf``, ``fastbert.cli``).
"""

from fastbert.config import BertConfig, ConfigError
from fastbert.hf import CheckpointError
from fastbert.model import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

__version__ = "0.1.0"

__all__ = [
    "BertConfig",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "CheckpointError",
    "ConfigError",
    "__version__",
]
