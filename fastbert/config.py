"""BertConfig: the model's shapes and switches, read from and written to HF ``config.json``.

This module owns every model-shape fact: sizes, presets and the variant switches from the seeds (ALBERT's
factorised embeddings and cross-layer sharing, RoBERTa/DistilBERT-style models without segments, pre-LN, the
sentence objective), and the label every head's loss ignores (``IGNORE_INDEX``). It knows which configs
transformers can represent (``model_type`` ``bert`` or ``albert``); any other config is written with
``model_type: fastbert`` so that transformers refuses it instead of loading it wrongly. It does not know about
weights (see ``fastbert.hf``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The sentence objectives a model head or a shard set can have; the C++ pair cutter lists the same names
# (fastbert._wordpiece.OBJECTIVES, held equal by a test).
OBJECTIVES = ("nsp", "sop", "none")
# The label of a position that carries no loss: the MLM labels of unmasked tokens, token-classification labels of
# special tokens and word continuations. HF's and torch's cross_entropy's default, so HF-style labels work as given.
IGNORE_INDEX = -100
# HF activation names -> whether GELU uses the tanh approximation. Exact erf GELU is BERT's.
GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
KNOWN_MODEL_TYPES = ("bert", "albert", "fastbert", "electra", "roberta-prelayernorm")
# Keys HF writes that do not change the model's function; they are accepted and dropped on read.
_IGNORED_HF_KEYS = {
    "architectures",
    "transformers_version",
    "_name_or_path",
    "gradient_checkpointing",
    "use_cache",
    "classifier_dropout",
    "classifier_dropout_prob",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
    "problem_type",
    "num_hidden_groups",
    "inner_group_num",
    "bos_token_id",
    "eos_token_id",
    "is_decoder",
    "add_cross_attention",
    "tie_word_embeddings",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "tokenizer_class",
    "prefix",
    "finetuning_task",
    "_attn_implementation_autoset",
    # ELECTRA's sequence-summary options (its multiple-choice head, which fastbert does not have)
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_last_dropout",
}


class ConfigError(ValueError):
    """A config value or config.json that fastbert cannot build a model from."""


def check_encoder_fields(config, *positive: str) -> None:
    """The checks every encoder config shares (BERT's and DeBERTa's): the sizes (and the ``positive`` fields named)
    positive integers, heads dividing the hidden size, a segment table of 0 or more rows, a supported activation and
    dropouts in [0, 1); a ``ConfigError`` names the field."""
    sizes = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    )
    for name in (*sizes, *positive):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
            f"({config.num_attention_heads})"
        )
    if not isinstance(config.type_vocab_size, int) or config.type_vocab_size < 0:
        raise ConfigError(f"type_vocab_size must be an integer >= 0, got {config.type_vocab_size!r}")
    if config.hidden_act not in GELU_APPROXIMATION:
        raise ConfigError(f"hidden_act {config.hidden_act!r} is not supported; use one of {sorted(GELU_APPROXIMATION)}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Variant switches. embedding_size=None is BERT (embeddings are hidden_size wide, no projection); an integer
    # gives ALBERT's factorised embeddings followed by a projection to hidden_size.
    embedding_size: int | None = None
    share_layers: bool = False
    pre_layer_norm: bool = False
    sentence_objective: str = "nsp"
    num_labels: int = 2
    id2label: dict[int, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_encoder_fields(self, "num_labels")
        if self.embedding_size is not None and (not isinstance(self.embedding_size, int) or self.embedding_size < 1):
            raise ConfigError(f"embedding_size must be a positive integer or None, got {self.embedding_size!r}")
        if self.sentence_objective not in OBJECTIVES:
            raise ConfigError(f"sentence_objective must be one of {OBJECTIVES}, got {self.sentence_objective!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")

    # Derived facts ----------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.hidden_size

    @property
    def gelu_approximation(self) -> str:
        return GELU_APPROXIMATION[self.hidden_act]

    @property
    def hf_model_type(self) -> str:
        """``bert``, ``albert`` or (pre-LN) ``roberta-prelayernorm`` when transformers can hold this model,
        ``fastbert`` otherwise (``prelayernorm_obstacle`` says why a pre-LN model is not RoBERTa-PreLayerNorm)."""
        if self.pre_layer_norm:
            return "fastbert" if self.prelayernorm_obstacle else "roberta-prelayernorm"
        if self.type_vocab_size == 0:
            return "fastbert"
        if self.embedding_size is not None:
            return "albert"
        return "fastbert" if self.share_layers else "bert"

    @property
    def prelayernorm_obstacle(self) -> str | None:
        """The option that keeps this config out of transformers' RoBERTa-PreLayerNorm (pre-LN, an embedding
        LayerNorm and a final LayerNorm, as fastbert's pre-LN; positions offset by ``pad_token_id + 1``; an MLM head
        with exact GELU; no sentence head), or None when it fits."""
        if not self.pre_layer_norm:
            return "pre_layer_norm=False (post-LN: model_type bert)"
        if self.share_layers:
            return "share_layers=True (RoBERTa-PreLayerNorm has one set of weights per layer)"
        if self.embedding_size is not None:
            return f"embedding_size={self.embedding_size} (RoBERTa-PreLayerNorm has no factorised embeddings)"
        if self.type_vocab_size == 0:
            return "type_vocab_size=0 (RoBERTa-PreLayerNorm always adds segment embeddings)"
        if self.sentence_objective != "none":
            return f"sentence_objective={self.sentence_objective!r} (RoBERTa-PreLayerNorm has no NSP/SOP head)"
        if self.hidden_act != "gelu":
            return f"hidden_act={self.hidden_act!r} (RoBERTa-PreLayerNorm's MLM head always uses exact GELU)"
        return None

    @property
    def position_offset(self) -> int:
        """Rows before position 0 in the HF position table: RoBERTa counts positions from ``pad_token_id + 1``."""
        return self.pad_token_id + 1 if self.hf_model_type == "roberta-prelayernorm" else 0

    # Presets ----------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)

    # config.json ------------------------------------------------------------------------------------------------
    def to_dict(self, model_type: str | None = None) -> dict[str, Any]:
        """config.json's contents as ``model_type`` (default: ``hf_model_type``) reads them."""
        d = dataclasses.asdict(self)
        model_type = model_type or self.hf_model_type
        d["model_type"] = model_type
        d["position_embedding_type"] = "absolute"
        if model_type == "roberta-prelayernorm":
            for key in ("pre_layer_norm", "share_layers", "embedding_size", "sentence_objective"):
                d.pop(key, None)
            d["max_position_embeddings"] = self.max_position_embeddings + self.position_offset
        if d.pop("id2label") is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: int(k) for k, v in self.id2label.items()}
        if model_type == "albert":
            # ALBERT's layer groups: one shared group, or one group per layer.
            d["num_hidden_groups"] = 1 if self.share_layers else self.num_hidden_layers
            d["inner_group_num"] = 1
            d["classifier_dropout_prob"] = self.hidden_dropout_prob
        return d

    def to_electra_dict(self) -> dict[str, Any]:
        """config.json for transformers' ELECTRA classes (``model_type: electra``): BERT's post-LN encoder with
        segment embeddings and one layer per layer, so pre-LN, shared layers or no segments are refused."""
        if self.pre_layer_norm or self.share_layers or self.type_vocab_size == 0:
            raise ConfigError(
                "transformers' ELECTRA is post-LN with segment embeddings and unshared layers; this config has "
                f"pre_layer_norm={self.pre_layer_norm}, share_layers={self.share_layers}, "
                f"type_vocab_size={self.type_vocab_size}"
            )
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("share_layers", "pre_layer_norm")}
        d.update(model_type="electra", embedding_size=self.embedding_width, position_embedding_type="absolute")
        if d.pop("id2label") is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: int(k) for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> BertConfig:
        d = dict(d)
        model_type = d.pop("model_type", "bert")
        if model_type not in KNOWN_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a BERT-family model fastbert can build "
                f"(known: {', '.join(KNOWN_MODEL_TYPES)})"
            )
        pos_type = d.pop("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        if model_type == "albert":
            groups, inner = d.pop("num_hidden_groups", 1), d.pop("inner_group_num", 1)
            layers = d.get("num_hidden_layers", 12)
            if inner != 1 or groups not in (1, layers):
                raise ConfigError(
                    f"{source}: ALBERT with num_hidden_groups={groups}, inner_group_num={inner} is not "
                    f"supported (use 1 shared group or one group per layer)"
                )
            d.setdefault("share_layers", groups == 1)
            d.setdefault("embedding_size", 128)
            d.setdefault("sentence_objective", "sop")
        if model_type == "roberta-prelayernorm":
            d["pre_layer_norm"] = True
            d.setdefault("sentence_objective", "none")
            offset = d.get("pad_token_id", 1) + 1
            d["max_position_embeddings"] = d.get("max_position_embeddings", 514) - offset
        if model_type == "electra":
            # ELECTRA always names its embedding width; equal to hidden_size it has no projection (BERT's layout).
            if d.get("embedding_size") == d.get("hidden_size", 768):
                d["embedding_size"] = None
            d.setdefault("sentence_objective", "none")
        id2label = d.pop("id2label", None)
        if id2label is not None:
            d["id2label"] = {int(k): v for k, v in id2label.items()}
            d.setdefault("num_labels", len(id2label))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in _IGNORED_HF_KEYS)
        if unknown:
            warnings.warn(f"{source}: ignoring config key(s) fastbert does not use: {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @staticmethod
    def read_json(path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BertConfig:
        return cls.from_dict(cls.read_json(path), source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BertConfig:
        return cls.from_json_file(Path(directory) / "config.json")

    def to_json_string(self, architecture: str | None = None, model_type: str | None = None) -> str:
        d = self.to_dict(model_type)
        if architecture is not None:
            d["architectures"] = [architecture]
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def save_pretrained(
        self, directory: str | os.PathLike, architecture: str | None = None, model_type: str | None = None
    ) -> None:
        from fastbert.atomic import write_atomic

        write_atomic(Path(directory) / "config.json", self.to_json_string(architecture, model_type).encode())


def read_model_config(path: str | os.PathLike):
    """The model config in the config.json at ``path``: a ``DebertaConfig`` for ``model_type: deberta-v2``, else a
    ``BertConfig`` (every BERT-family type fastbert reads)."""
    from fastbert import deberta

    raw = BertConfig.read_json(path)
    if raw.get("model_type") == deberta.MODEL_TYPE:
        return deberta.DebertaConfig.from_dict(raw, source=str(path))
    return BertConfig.from_dict(raw, source=str(path))


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "mini": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
