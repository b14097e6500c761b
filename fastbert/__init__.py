"""fastbert: a fast, exact BERT training engine.

The models, config and tokenizer are importable from here; the rest lives in submodules (``fastbert.ops``,
``fastbert.hf``, ``fastbert.cli``). The names below are imported on first use, so importing a torch-free part of
the package (the tokenizer, ``fastbert --help``, ``fastbert tokenize``, prepare-data's workers) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each exported name -> the module that defines it.
_EXPORTS = {
    "BertConfig": "fastbert.config",
    "BertForPreTraining": "fastbert.model",
    "BertForQuestionAnswering": "fastbert.model",
    "BertForSequenceClassification": "fastbert.model",
    "BertForTokenClassification": "fastbert.model",
    "BertModel": "fastbert.model",
    "CheckpointError": "fastbert.hf",
    "ConfigError": "fastbert.config",
    "DebertaConfig": "fastbert.deberta",
    "DebertaForMaskedLM": "fastbert.deberta",
    "DebertaForQuestionAnswering": "fastbert.deberta",
    "DebertaForSequenceClassification": "fastbert.deberta",
    "DebertaForTokenClassification": "fastbert.deberta",
    "DebertaModel": "fastbert.deberta",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
