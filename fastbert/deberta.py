"""DeBERTa-v3: its config, the encoder with disentangled attention, the MLM and task heads, and HF interchange.

The model is transformers' ``DebertaV2Model`` / ``DebertaV2ForMaskedLM`` function (post-LN layers; word embeddings,
by default no absolute positions, an embedding LayerNorm; one relative-position table shared by every layer, with its
own LayerNorm; attention scores from content and from relative positions, ``fastbert.kernels.disentangled_attention``)
and reads and writes their checkpoints: ``config.json`` with ``model_type: deberta-v2`` and ``model.safetensors``
under transformers' key names. The task heads are transformers' ``DebertaV2ForSequenceClassification`` (its pooler),
``...ForTokenClassification`` and ``...ForQuestionAnswering``, called as BERT's heads are, so that ``fastbert
finetune`` runs every task on a DeBERTa directory. What this port does not build is refused with the config key or
checkpoint key that asks for it, before any weight is read: the convolution after the first layer
(``conv_kernel_size > 0``), attention terms other than ``c2p`` / ``p2c``, models without relative attention, a
factorised embedding width, a head size other than ``hidden_size / num_attention_heads``, position-bucket settings
whose log buckets are undefined, and the enhanced mask decoder's extra weights. The encoder runs on the padded
layout (``input_ids [B, S]`` with ``attention_mask``); the heads also take BERT's other layouts (a host-built
``Layout``, or flat ids with ``cu_seqlens``), padded on the device. Without a segment table (``type_vocab_size=0``,
DeBERTa-v3's) segment ids are ignored, as transformers ignores them. The attention is ``ops.disentangled_attention``:
the fused Triton kernel on CUDA tensors; on the CPU the plain-PyTorch reference, by query blocks for long sequences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.config import (
    _IGNORED_HF_KEYS,
    GELU_APPROXIMATION,
    IGNORE_INDEX,
    BertConfig,
    ConfigError,
    check_encoder_fields,
)
from fastbert.hf import CheckpointError, LoadingInfo, read_state_dict, warn_if_partly_loaded
from fastbert.kernels import disentangled_attention as dsa
from fastbert.model import (
    ClassifierOutput,
    Layout,
    PreTrainingOutput,
    QuestionAnsweringOutput,
    _check_range,
    check_token_ids,
    init_modules,
    masked_lm_loss,
)

MODEL_TYPE = "deberta-v2"
# transformers' DebertaV2Config defaults: a config.json that leaves a key out means this value, not ours.
_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128100,
    "hidden_size": 1536,
    "num_hidden_layers": 24,
    "num_attention_heads": 24,
    "intermediate_size": 6144,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "pad_token_id": 0,
    "position_biased_input": True,
    "position_buckets": -1,
    "max_relative_positions": -1,
    "pos_att_type": None,
    "share_att_key": False,
    "norm_rel_ebd": "none",
}
# Keys of DeBERTa configs that change nothing fastbert builds (``legacy`` is read from the checkpoint's keys).
_IGNORED_DEBERTA_KEYS = {"legacy"}


@dataclass
class DebertaConfig:
    """A DeBERTa-v2/v3 encoder's shapes and switches; field names and meanings are transformers' ``DebertaV2Config``.

    ``max_relative_positions < 1`` means ``max_position_embeddings``; ``position_buckets <= 0`` uses raw distances
    clipped at ``max_relative_positions`` instead of log buckets. ``pos_att_type`` is any subset of
    ``("c2p", "p2c")`` (a ``"p2c|c2p"`` string as in config.json is accepted).
    """

    vocab_size: int = 128100
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    position_biased_input: bool = False
    position_buckets: int = 256
    max_relative_positions: int = -1
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    # Task heads, as transformers' DeBERTa-v2 heads read them: the number of outputs and their names, and the
    # sequence classifier's pooler (dropout, dense to ``pooler_hidden_size`` (None: ``hidden_size``), activation)
    # and its dropout before the classifier (``cls_dropout``; None: ``hidden_dropout_prob``).
    num_labels: int = 2
    id2label: dict[int, str] | None = field(default=None, repr=False)
    pooler_hidden_size: int | None = None
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None

    def __post_init__(self) -> None:
        check_encoder_fields(self, "num_labels")
        if self.pooler_hidden_size is not None and (
            not isinstance(self.pooler_hidden_size, int) or self.pooler_hidden_size < 1
        ):
            raise ConfigError(f"pooler_hidden_size must be a positive integer, got {self.pooler_hidden_size!r}")
        if self.pooler_hidden_act not in GELU_APPROXIMATION:
            raise ConfigError(
                f"pooler_hidden_act {self.pooler_hidden_act!r} is not supported; use one of "
                f"{sorted(GELU_APPROXIMATION)}"
            )
        for name in ("pooler_dropout", "cls_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id {self.pad_token_id!r} is outside the vocabulary (size {self.vocab_size})")
        terms = self.pos_att_type
        if terms is None:
            terms = ()
        elif isinstance(terms, str):
            terms = tuple(t.strip() for t in terms.lower().split("|") if t.strip())
        else:
            terms = tuple(terms)
        unknown = [t for t in terms if t not in dsa.POSITION_TERMS]
        if unknown or len(set(terms)) != len(terms):
            raise ConfigError(
                f"pos_att_type {self.pos_att_type!r}: each attention term must be one of {list(dsa.POSITION_TERMS)}, "
                f"at most once (got {unknown or list(terms)})"
            )
        self.pos_att_type = terms
        if self.norm_rel_ebd not in ("layer_norm", "none"):
            raise ConfigError(f"norm_rel_ebd {self.norm_rel_ebd!r} is not supported; use 'layer_norm' or 'none'")
        for name in ("position_buckets", "max_relative_positions"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.position_buckets > 0:
            half = self.position_buckets // 2
            if half < 1:
                raise ConfigError(
                    f"position_buckets must be >= 2 (or <= 0 for no buckets), got {self.position_buckets}"
                )
            if self.relative_distance <= half + 1:
                # log((max_relative_positions - 1) / (position_buckets // 2)) is the buckets' denominator
                raise ConfigError(
                    f"position_buckets={self.position_buckets} needs max_relative_positions (here "
                    f"{self.relative_distance}, from max_relative_positions={self.max_relative_positions} and "
                    f"max_position_embeddings={self.max_position_embeddings}) above position_buckets // 2 + 1 = "
                    f"{half + 1}: the log buckets are undefined otherwise"
                )

    # Derived facts ----------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pooler_width(self) -> int:
        return self.pooler_hidden_size or self.hidden_size

    @property
    def classifier_dropout(self) -> float:
        return self.hidden_dropout_prob if self.cls_dropout is None else self.cls_dropout

    @property
    def gelu_approximation(self) -> str:
        return GELU_APPROXIMATION[self.hidden_act]

    @property
    def relative_distance(self) -> int:
        """The distance the log buckets reach (``max_relative_positions``, or ``max_position_embeddings`` when < 1)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def position_span(self) -> int:
        """Half the height of the relative-position table."""
        return dsa.position_span(self.position_buckets, self.relative_distance)

    # Presets ----------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DebertaConfig:
        if name not in DEBERTA_PRESETS:
            raise ConfigError(f"unknown DeBERTa preset {name!r}; choose from {sorted(DEBERTA_PRESETS)}")
        return cls(**{**DEBERTA_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> DebertaConfig:
        return dataclasses.replace(self, **changes)

    # config.json ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """config.json's contents as transformers' ``DebertaV2Config`` reads them; every switch written out, since
        transformers' defaults differ from v3's. ``legacy: false`` selects the MLM head layout fastbert writes."""
        d = dataclasses.asdict(self)
        d["pos_att_type"] = list(self.pos_att_type)
        d.update(model_type=MODEL_TYPE, relative_attention=True, legacy=False, pooler_hidden_size=self.pooler_width)
        if d.pop("cls_dropout") is not None:
            d["cls_dropout"] = self.cls_dropout
        if d.pop("id2label") is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: int(k) for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> DebertaConfig:
        """Read a transformers config.json; what it leaves out means transformers' default. Options this port does
        not build raise ``ConfigError`` naming the key."""
        d = {**_TRANSFORMERS_DEFAULTS, **d}
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not {MODEL_TYPE!r} (DeBERTa v1 and other models are not "
                "built by fastbert.deberta)"
            )
        refused = []
        if not d.pop("relative_attention", False):
            refused.append("relative_attention=false (this port always uses relative attention)")
        conv = d.pop("conv_kernel_size", 0)
        if conv and conv > 0:
            refused.append(f"conv_kernel_size={conv} (the convolution layer after the first layer is not built)")
        for key in ("conv_groups", "conv_act"):
            d.pop(key, None)
        if d.get("z_steps", 0):
            refused.append(f"z_steps={d['z_steps']} (the enhanced mask decoder is not built)")
        d.pop("z_steps", None)
        hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
        head_size = d.pop("attention_head_size", None)
        if head_size is not None and isinstance(heads, int) and head_size * heads != hidden:
            refused.append(f"attention_head_size={head_size} (only hidden_size / num_attention_heads is built)")
        embedding_size = d.pop("embedding_size", None)
        if embedding_size is not None and embedding_size != hidden:
            refused.append(f"embedding_size={embedding_size} (factorised embeddings are not built)")
        if refused:
            raise ConfigError(f"{source}: not supported by fastbert's DeBERTa: " + "; ".join(refused))
        if d.get("pad_token_id") is None:
            d["pad_token_id"] = 0
        id2label = d.pop("id2label", None)
        if id2label is not None:
            d["id2label"] = {int(k): v for k, v in id2label.items()}
            d.setdefault("num_labels", len(id2label))
        if d.get("pooler_hidden_size") == d.get("hidden_size"):
            d["pooler_hidden_size"] = None  # the default: the hidden size, whatever it becomes
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = _IGNORED_HF_KEYS | _IGNORED_DEBERTA_KEYS
        unknown = sorted(k for k in d if k not in known and k not in ignored)
        if unknown:
            warnings.warn(f"{source}: ignoring config key(s) fastbert does not use: {unknown}", stacklevel=2)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DebertaConfig:
        path = Path(directory) / "config.json"
        return cls.from_dict(BertConfig.read_json(path), source=str(path))

    def to_json_string(self, architecture: str | None = None) -> str:
        d = self.to_dict()
        if architecture is not None:
            d["architectures"] = [architecture]
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


DEBERTA_PRESETS: dict[str, dict[str, Any]] = {
    # A small shape for tests and the CPU, with BERT's vocabulary size.
    "deberta-tiny": dict(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    ),
    # DeBERTa-v3-small and -base (128k SentencePiece vocabulary).
    "deberta-small": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "deberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


# Outputs --------------------------------------------------------------------------------------------------------
@dataclass
class DebertaModelOutput:
    last_hidden_state: torch.Tensor


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    logits: torch.Tensor | None = None


# Modules --------------------------------------------------------------------------------------------------------
class DebertaEmbeddings(nn.Module):
    """Word (+ absolute position, + segment) embeddings, LayerNorm, padding zeroed, dropout."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, h) if config.position_biased_input else None
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h) if config.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids, mask, token_type_ids=None, position_ids=None, word_vectors=None) -> torch.Tensor:
        """``word_vectors`` (``[B, S, hidden]``), when given, replace the lookup of ``input_ids`` in the word table
        (DeBERTa-v3's discriminator looks its tokens up in its generator's table; ``fastbert.deberta_electra``)."""
        x = self.word_embeddings(input_ids) if word_vectors is None else word_vectors
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.norm(x) * mask[..., None].to(x.dtype)
        return ops.dropout(x, self.config.hidden_dropout_prob, self.training)


class DebertaLayer(nn.Module):
    """Disentangled self-attention then the FFN, each followed by residual + LayerNorm (post-LN)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        # Without share_att_key the relative-position table has its own projections, one per position term.
        separate = not config.share_att_key
        self.pos_key = nn.Linear(h, h) if separate and "c2p" in config.pos_att_type else None
        self.pos_query = nn.Linear(h, h) if separate and "p2c" in config.pos_att_type else None
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., rows, hidden]`` -> ``[..., heads, rows, head_dim]``."""
        c = self.config
        return x.view(*x.shape[:-1], c.num_attention_heads, c.head_dim).transpose(-2, -3)

    def _attention(self, x, mask, rel_table, rel_index) -> torch.Tensor:
        c = self.config
        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        rel_table = ops.dropout(rel_table, c.hidden_dropout_prob, self.training)
        pos_key = pos_query = None
        if "c2p" in c.pos_att_type:
            pos_key = self._heads((self.key if c.share_att_key else self.pos_key)(rel_table))
        if "p2c" in c.pos_att_type:
            pos_query = self._heads((self.query if c.share_att_key else self.pos_query)(rel_table))
        p = c.attention_probs_dropout_prob if self.training else 0.0
        out = ops.disentangled_attention(
            q,
            k,
            v,
            rel_index,
            pos_key,
            pos_query,
            mask,
            dropout_p=p,
            position_buckets=c.position_buckets,
            max_relative_positions=c.relative_distance,
        )
        return out.transpose(1, 2).reshape(x.shape)

    def forward(self, x, mask, rel_table, rel_index) -> torch.Tensor:
        c, p, train = self.config, self.config.hidden_dropout_prob, self.training
        shape = x.shape
        a = F.linear(self._attention(x, mask, rel_table, rel_index), self.attn_out.weight).view(-1, shape[-1])
        x, _ = ops.residual_layer_norm(
            a,
            x.view(-1, shape[-1]),
            self.attn_norm.weight,
            self.attn_norm.bias,
            c.layer_norm_eps,
            self.attn_out.bias,
            p,
            train,
        )
        h = ops.bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias, c.gelu_approximation)
        x, _ = ops.residual_layer_norm(
            F.linear(h, self.ffn_out.weight),
            x,
            self.ffn_norm.weight,
            self.ffn_norm.bias,
            c.layer_norm_eps,
            self.ffn_out.bias,
            p,
            train,
        )
        return x.view(shape)


class DebertaEncoder(nn.Module):
    """The layers and the relative-position table (``2 * position_span`` rows, LayerNorm'd) they all share."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DebertaLayer(config) for _ in range(config.num_hidden_layers))
        self.rel_embeddings = nn.Embedding(2 * config.position_span, config.hidden_size)
        self.rel_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_rel_ebd == "layer_norm" else None
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        rel_table = self.rel_embeddings.weight
        rel_index = None  # the kernel takes the bucket settings; the torch paths this [seq, seq] table
        if not ops.uses_kernel("disentangled_attention", x):
            rel_index = ops.relative_index(x.shape[1], c.position_buckets, c.relative_distance, x.device)
            if rel_index.numel() and x.device.type == "cpu":  # (on a GPU the reads would be host syncs)
                # Only the rows a pair of this length can reach (a contiguous run: the bucket grows with the
                # distance): 255 of 512 at 128 tokens, so the position projections and terms do half the work.
                first, last = int(rel_index.min()), int(rel_index.max())
                if first > 0 or last < rel_table.shape[0] - 1:  # at 2048 every row is reached: no [L, L] copy
                    rel_table, rel_index = rel_table[first : last + 1], rel_index - first
        if self.rel_norm is not None:
            rel_table = self.rel_norm(rel_table)  # row by row, so a slice of the table's norm is the norm of its slice
        for layer in self.layers:
            x = layer(x, mask, rel_table, rel_index)
        return x


class DebertaMLMHead(nn.Module):
    """Dense, GELU, LayerNorm, then the decoder tied to the word embeddings plus its own bias."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(hidden, self.transform.weight), self.transform.bias, self.config.gelu_approximation)
        return F.layer_norm(
            h, (h.shape[-1],), self.transform_norm.weight, self.transform_norm.bias, self.config.layer_norm_eps
        )


class DebertaPreTrainedModel(nn.Module):
    """Shared by the DeBERTa classes: initialisation and transformers-compatible ``from_pretrained`` /
    ``save_pretrained``."""

    config: DebertaConfig

    def init_weights(self) -> None:
        """BERT's initialisation (transformers' for DeBERTa too), drawn once: a head model's encoder was initialised
        by its own constructor."""
        encoder = getattr(self, "deberta", None)
        done = set(encoder.modules()) if isinstance(encoder, DebertaModel) else set()
        init_modules([m for m in self.modules() if m not in done], self.config.initializer_range)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        config: DebertaConfig | None = None,
        output_loading_info: bool = False,
        **config_overrides,
    ):
        """Load a transformers DeBERTa-v2/v3 checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin). Unsupported options raise before any weight is read; missing and unexpected keys are
        reported as a warning (and returned with ``output_loading_info=True``); shapes are checked before any weight
        is copied."""
        return load_pretrained(cls, directory, config, output_loading_info, **config_overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors as transformers' ``DebertaV2Model`` / ``DebertaV2ForMaskedLM``
        read them."""
        save_pretrained(self, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DebertaModel(DebertaPreTrainedModel):
    """The encoder over a padded batch: ``input_ids [B, S]`` and ``attention_mask [B, S]`` (1 for real tokens);
    ``last_hidden_state [B, S, hidden]`` is zero at padding."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.embeddings = DebertaEmbeddings(config)
        self.encoder = DebertaEncoder(config)
        self.init_weights()

    def encode_any(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        cu_seqlens=None,
        max_seqlen=None,
        word_vectors=None,
    ) -> tuple[torch.Tensor, torch.Tensor, Layout | None]:
        """``encode`` for the layouts BERT's classes take: a tensor mask; a host-built ``Layout`` of a padded batch as
        ``attention_mask`` (what fine-tuning passes); or an unpadded batch (flat ``input_ids [T]`` with
        ``cu_seqlens``), padded here on the device without a host read. Returns the padded ``(hidden, mask)`` and
        the ``Layout`` that maps them back to the caller's layout (None for a tensor mask)."""
        layout = None
        if cu_seqlens is not None:
            if input_ids.dim() != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be flat [tokens], got {tuple(input_ids.shape)}")
            layout = _unpadded_layout(cu_seqlens, max_seqlen, input_ids.shape[0], input_ids.device)
            batch, seq = layout.shape
            flat = input_ids.new_zeros(batch * seq).index_copy(0, layout.index, input_ids)
            ids = flat.view(batch, seq)
            mask = torch.zeros(batch * seq, dtype=torch.bool, device=input_ids.device).index_fill(0, layout.index, True)
            attention_mask = mask.view(batch, seq)
            if token_type_ids is not None:
                token_type_ids = layout.pad(token_type_ids)
            if position_ids is not None:
                position_ids = layout.pad(position_ids)
            if word_vectors is not None:
                word_vectors = layout.pad(word_vectors)
            input_ids = ids
        elif isinstance(attention_mask, Layout):
            layout = attention_mask
            if layout.index is None or layout.shape != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask is a Layout for shape {layout.shape}, not this padded batch "
                    f"{tuple(input_ids.shape)}"
                )
            attention_mask = (
                torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
                .index_fill(0, layout.index, True)
                .view(input_ids.shape)
            )
        hidden, mask = self.encode(input_ids, attention_mask, token_type_ids, position_ids, word_vectors)
        return hidden, mask, layout

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, word_vectors=None):
        """``(hidden [B, S, hidden], mask [B, S] bool)``; ``word_vectors`` as ``DebertaEmbeddings`` takes them."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        else:
            mask = attention_mask.bool()
        if self.config.type_vocab_size == 0:
            token_type_ids = None  # no segment table (DeBERTa-v3's): segment ids are ignored, as transformers does
        self._check_inputs(input_ids, token_type_ids, position_ids)
        hidden = self.encoder(self.embeddings(input_ids, mask, token_type_ids, position_ids, word_vectors), mask)
        return hidden * mask[..., None].to(hidden.dtype), mask

    def _check_inputs(self, input_ids, token_type_ids, position_ids) -> None:
        c = self.config
        check_token_ids(input_ids, token_type_ids, c.vocab_size, c.type_vocab_size)
        if not c.position_biased_input:
            if position_ids is not None:
                raise ValueError(
                    "position_ids given, but this model has no absolute positions (position_biased_input=False): "
                    "its relative positions come from token order"
                )
            return
        if position_ids is not None:
            _check_range("position_ids", position_ids, c.max_position_embeddings, "max_position_embeddings")
        elif input_ids.shape[1] > c.max_position_embeddings:
            raise IndexError(
                f"a sequence has {input_ids.shape[1]} positions but max_position_embeddings is "
                f"{c.max_position_embeddings} (absolute positions, position_biased_input=True): the sequence is too "
                "long"
            )

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> DebertaModelOutput:
        return DebertaModelOutput(self.encode(input_ids, attention_mask, token_type_ids, position_ids)[0])


class DebertaForMaskedLM(DebertaPreTrainedModel):
    """The encoder and the MLM head. With ``labels`` (``-100`` where no prediction is asked), the head runs on the
    labelled positions only and returns their mean cross-entropy and accuracy; without, ``logits [B, S, vocab]``
    (zero at padding)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.cls = DebertaMLMHead(config)
        self.init_weights()

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.deberta.embeddings.word_embeddings.weight

    def forward(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None
    ) -> MaskedLMOutput:
        hidden, mask = self.deberta.encode(input_ids, attention_mask, token_type_ids, position_ids)
        if labels is None:
            logits = F.linear(self.cls.transform_hidden(hidden), self.decoder_weight, self.cls.bias)
            return MaskedLMOutput(logits=logits * mask[..., None].to(logits.dtype))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        loss, accuracy = masked_lm_loss(
            self.cls.transform_hidden,
            hidden.reshape(-1, hidden.shape[-1]),
            labels.reshape(-1),
            self.decoder_weight,
            self.cls.bias,
        )
        return MaskedLMOutput(loss=loss, accuracy=accuracy)


class DebertaForPreTraining(DebertaForMaskedLM):
    """``DebertaForMaskedLM`` as the pretraining driver calls a model (BERT's ``BertForPreTraining`` interface): an
    unpadded batch (flat ``input_ids`` with ``cu_seqlens``) or a padded one, ``labels`` in the same layout, and the
    collator's ``masked_positions`` (flat indices of the labelled tokens, so that the forward pass reads nothing back
    to find them); returns a ``PreTrainingOutput`` with the MLM loss and accuracy. MLM only: DeBERTa-v3 has no
    sentence objective. Its weights and checkpoints are ``DebertaForMaskedLM``'s (``DebertaV2ForMaskedLM``)."""

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        next_sentence_label=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
        masked_positions=None,
    ) -> PreTrainingOutput:
        if next_sentence_label is not None:
            raise ValueError("next_sentence_label given, but DeBERTa pretrains with MLM only (no sentence objective)")
        if not self.config.position_biased_input:
            # The pretraining collator gives each sequence's positions 0..n-1: for a model with relative positions
            # only, that is its token order, which the attention reads by itself.
            position_ids = None
        hidden, mask, layout = self.deberta.encode_any(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        if layout is None:  # a padded batch with a tensor mask, unpadded here as BERT's encoder does
            layout = Layout.from_attention_mask(mask)
        flat = layout.unpad(hidden)  # the real tokens' rows, in order: what labels and masked_positions index
        out = PreTrainingOutput()
        if labels is None:
            logits = F.linear(self.cls.transform_hidden(flat), self.decoder_weight, self.cls.bias)
            out.prediction_logits = logits if cu_seqlens is not None else layout.pad(logits)
            return out
        out.mlm_loss, out.mlm_accuracy = masked_lm_loss(
            self.cls.transform_hidden,
            flat,
            labels.reshape(-1) if cu_seqlens is not None else layout.unpad(labels),
            self.decoder_weight,
            self.cls.bias,
            masked_positions,
        )
        out.loss = out.mlm_loss
        return out


def _unpadded_layout(cu_seqlens: torch.Tensor, max_seqlen: int | None, tokens: int, device) -> Layout:
    """Where the ``tokens`` tokens of an unpadded batch sit in its padded ``[B, max_seqlen]`` form, computed on the
    device (a host read only when ``max_seqlen`` is not given)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if max_seqlen is None:
        max_seqlen = int(cu.diff().max()) if cu.numel() > 1 else 0
    token = torch.arange(tokens, device=device)
    sequence = torch.bucketize(token, cu[1:], right=True)
    index = sequence * max_seqlen + (token - cu[sequence])
    return Layout(cu.to(torch.int32), max_seqlen, index, (cu.numel() - 1, max_seqlen))


class DebertaPooler(nn.Module):
    """transformers' ``ContextPooler``: the first token, dropout, dense to ``pooler_hidden_size``, activation."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.pooler_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = ops.dropout(hidden[:, 0], self.config.pooler_dropout, self.training)
        approximate = GELU_APPROXIMATION[self.config.pooler_hidden_act]
        return ops.bias_gelu(F.linear(first, self.dense.weight), self.dense.bias, approximate)


class DebertaForSequenceClassification(DebertaPreTrainedModel):
    """Classifier on the pooled first token (transformers' ``DebertaV2ForSequenceClassification``); regression (mean
    squared error) when ``num_labels == 1``. Takes BERT's layouts (``DebertaModel.encode_any``)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.pooler = DebertaPooler(config)
        self.classifier = nn.Linear(config.pooler_width, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> ClassifierOutput:
        hidden, _, _ = self.deberta.encode_any(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        pooled = ops.dropout(self.pooler(hidden), self.config.classifier_dropout, self.training)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = F.cross_entropy(logits, labels.view(-1))
        return ClassifierOutput(loss, logits)


class DebertaForTokenClassification(DebertaPreTrainedModel):
    """Per-token classifier (transformers' ``DebertaV2ForTokenClassification``); padding positions get zero logits
    and are never in the loss. Logits come back in the caller's layout (padded, or flat for ``cu_seqlens``)."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> ClassifierOutput:
        hidden, mask, layout = self.deberta.encode_any(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        logits = self.classifier(ops.dropout(hidden, self.config.hidden_dropout_prob, self.training))
        logits = logits * mask[..., None].to(logits.dtype)
        loss = None
        if labels is not None:
            if cu_seqlens is not None:
                labels = layout.pad(labels, fill=IGNORE_INDEX)
            labels = labels.masked_fill(~mask, IGNORE_INDEX)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        if cu_seqlens is not None:
            logits = layout.unpad(logits)
        return ClassifierOutput(loss, logits)


class DebertaForQuestionAnswering(DebertaPreTrainedModel):
    """Start/end span logits per token (transformers' ``DebertaV2ForQuestionAnswering``), on a padded batch; padding
    positions get the lowest finite logit so that no span ends there."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        # Two outputs, start and end: transformers sizes qa_outputs by num_labels, so the saved config says 2.
        config = config if config.num_labels == 2 else config.replace(num_labels=2, id2label=None)
        self.config = config
        self.deberta = DebertaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> QuestionAnsweringOutput:
        if cu_seqlens is not None:
            raise ValueError("DebertaForQuestionAnswering needs the padded layout (input_ids [B, S])")
        hidden, mask, _ = self.deberta.encode_any(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.qa_outputs(hidden).masked_fill(~mask[..., None], torch.finfo(hidden.dtype).min)
        start_logits, end_logits = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]  # positions outside the sequence are ignored, as in transformers
            start = F.cross_entropy(start_logits, start_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            end = F.cross_entropy(end_logits, end_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            loss = (start + end) / 2
        return QuestionAnsweringOutput(loss, start_logits, end_logits)


# BERT's head class name -> DeBERTa's, for fine-tuning a DeBERTa checkpoint with a task written for BERT's heads.
TASK_HEADS = {
    "BertForSequenceClassification": DebertaForSequenceClassification,
    "BertForTokenClassification": DebertaForTokenClassification,
    "BertForQuestionAnswering": DebertaForQuestionAnswering,
}


def is_deberta_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory``'s config.json is a DeBERTa-v2/v3 one (``model_type: deberta-v2``)."""
    path = Path(directory) / "config.json"
    return path.exists() and BertConfig.read_json(path).get("model_type") == MODEL_TYPE


# HF interchange -------------------------------------------------------------------------------------------------
# Our per-layer module names -> transformers' (under deberta.encoder.layer.<i>.).
_LAYER_NAMES = {
    "query": "attention.self.query_proj",
    "key": "attention.self.key_proj",
    "value": "attention.self.value_proj",
    "pos_key": "attention.self.pos_key_proj",
    "pos_query": "attention.self.pos_query_proj",
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_BASE_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "encoder.rel_embeddings": "encoder.rel_embeddings",
    "encoder.rel_norm": "encoder.LayerNorm",
}
# The MLM head in transformers' two layouts: ``legacy`` (its config default; a decoder module tied to the word
# embeddings) and the one DeBERTa-v3's released checkpoints use (``legacy: false``).
_HEAD_NAMES = {
    True: {
        "transform": "cls.predictions.transform.dense",
        "transform_norm": "cls.predictions.transform.LayerNorm",
        "bias": "cls.predictions.bias",
    },
    False: {
        "transform": "lm_predictions.lm_head.dense",
        "transform_norm": "lm_predictions.lm_head.LayerNorm",
        "bias": "lm_predictions.lm_head.bias",
    },
}
_HEAD_ROOTS = ("cls.", "lm_predictions.", "mask_predictions.")
# Task heads: the same module names as transformers', outside the ``deberta.`` prefix.
_TASK_ROOTS = ("pooler.", "classifier.", "qa_outputs.")
_PREFIX = "deberta."
# Checkpoint keys that hold no weight of ours: a buffer, the legacy decoder (tied; checked equal), and the replaced
# token detection head of DeBERTa-v3's ELECTRA-style pretraining (transformers drops it too).
_IGNORABLE = re.compile(
    r"deberta\.embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)|mask_predictions\..*"
)


def checkpoint_key_map(model: nn.Module, legacy: bool = False) -> dict[str, str]:
    """Each of the model's state_dict keys -> its checkpoint key in transformers' layout (encoder keys with the
    ``deberta.`` prefix; the MLM head in the ``legacy`` or the v3 layout)."""
    out = {}
    for key in model.state_dict():
        if key.startswith("cls."):
            module, _, leaf = key[len("cls.") :].rpartition(".")
            out[key] = _HEAD_NAMES[legacy]["bias"] if not module else f"{_HEAD_NAMES[legacy][module]}.{leaf}"
            continue
        if key.startswith(_TASK_ROOTS):
            out[key] = key
            continue
        local = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        module, _, leaf = local.rpartition(".")
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(\w+)", module)
        if layer is not None:
            theirs = f"encoder.layer.{layer[1]}.{_LAYER_NAMES[layer[2]]}"
        elif module in _BASE_NAMES:
            theirs = _BASE_NAMES[module]
        else:
            raise CheckpointError(f"{type(model).__name__} key {key!r} has no checkpoint name in fastbert.deberta")
        out[key] = f"{_PREFIX}{theirs}.{leaf}"
    return out


def _head_layout(state: dict[str, torch.Tensor], raw_config: dict[str, Any]) -> bool:
    """Whether the checkpoint's MLM head is in the legacy layout: from its keys, else from its config."""
    if any(k.startswith("lm_predictions.lm_head.") for k in state):
        return False
    if any(k.startswith("cls.predictions.") for k in state):
        return True
    return bool(raw_config.get("legacy", True))


def load_pretrained(cls, directory, config=None, output_loading_info=False, **config_overrides):
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    raw = BertConfig.read_json(config_path)
    if config is None:
        config = DebertaConfig.from_dict(raw, source=str(config_path))
    if config_overrides:
        config = config.replace(**config_overrides)
    state, path = read_state_dict(directory)
    state = {k if k.startswith((_PREFIX, *_HEAD_ROOTS, *_TASK_ROOTS)) else _PREFIX + k: v for k, v in state.items()}
    decoder_extras = sorted(
        k for k in state if k.startswith("lm_predictions.") and not k.startswith("lm_predictions.lm_head.")
    )
    if decoder_extras:
        raise CheckpointError(
            f"{path}: the enhanced mask decoder's weights {decoder_extras[:4]} are not supported by fastbert's DeBERTa"
        )
    legacy = _head_layout(state, raw)
    model = cls(config)
    names = checkpoint_key_map(model, legacy)
    ours = model.state_dict()
    info, errors, updates = LoadingInfo(), [], {}
    if legacy and "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
        state["cls.predictions.bias"] = state["cls.predictions.decoder.bias"]  # the tied pair saved under one name
    for key, name in names.items():
        if name not in state:
            info.missing_keys.append(key)
        elif state[name].shape != ours[key].shape:
            errors.append(
                f"{name}: checkpoint shape {tuple(state[name].shape)} != model shape {tuple(ours[key].shape)}"
            )
        else:
            updates[key] = state[name]
    for decoder, tied in (
        ("cls.predictions.decoder.weight", "deberta.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ):
        if decoder in state and tied in state and not torch.equal(state[decoder], state[tied]):
            errors.append(f"{decoder}: differs from {tied}; fastbert's DeBERTa ties them")
    if errors:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}; nothing was loaded:\n  " + "\n  ".join(errors)
        )
    used = set(names.values())
    if not config.position_biased_input:  # a relative-only model ignores an absolute table, as transformers does
        used.add("deberta.embeddings.position_embeddings.weight")
    info.unexpected_keys = sorted(k for k in state if k not in used and not _IGNORABLE.fullmatch(k))
    with torch.no_grad():
        for key, value in updates.items():
            ours[key].copy_(value)
    warn_if_partly_loaded(cls, path, info)
    return (model, info) if output_loading_info else model


_ARCHITECTURES = {
    "DebertaModel": "DebertaV2Model",
    "DebertaForMaskedLM": "DebertaV2ForMaskedLM",
    "DebertaForPreTraining": "DebertaV2ForMaskedLM",
    "DebertaForSequenceClassification": "DebertaV2ForSequenceClassification",
    "DebertaForTokenClassification": "DebertaV2ForTokenClassification",
    "DebertaForQuestionAnswering": "DebertaV2ForQuestionAnswering",
}


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (the v3 head layout); a bare encoder without the prefix, as
    transformers saves its base model."""
    names = checkpoint_key_map(model, legacy=False)
    bare = not hasattr(model, "deberta")
    out = {}
    for key, value in model.state_dict().items():
        name = names[key][len(_PREFIX) :] if bare else names[key]
        out[name] = value.detach().contiguous().cpu()
    return out


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    from fastbert.hf import write_checkpoint

    arch = _ARCHITECTURES.get(type(model).__name__, type(model).__name__)
    write_checkpoint(directory, hf_state_dict(model), model.config.to_json_string(arch))
