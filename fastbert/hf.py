"""HF checkpoint interchange: load ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` into fastbert
models and save them back in the layout transformers reads.

Configs transformers can represent are written as ``bert`` (BertModel / BertForPreTraining / BertForMaskedLM key
layouts), ``albert`` (factorised embeddings, shared layers, SOP) or, for pre-LN encoders and MLM-only pretraining
models, ``roberta-prelayernorm`` (RobertaPreLayerNormModel / ForMaskedLM: the same function, with the position
table shifted by RoBERTa's ``pad_token_id + 1`` offset); anything else (no segment embeddings, BERT with shared
layers, pre-LN with a sentence head or a fine-tuning head) is written with ``model_type: fastbert`` and fastbert's
own key names, which transformers refuses rather than misreads. Loading accepts checkpoints with or without the
``bert.`` / ``albert.`` prefix and old TF-converted ``gamma`` / ``beta`` names, reports missing and unexpected keys,
and checks every shape before any weight is copied. Weights are read with safetensors or
``torch.load(weights_only=True)``, so a checkpoint never runs code. transformers' ELECTRA checkpoints (``model_type:
electra``: BERT's encoder, with ``embeddings_project`` where the embeddings are narrower) load as well;
``fastbert.electra`` writes them. This module does not define models (``fastbert.model``) or configs
(``fastbert.config``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastbert.atomic import write_atomic
from fastbert.config import BertConfig

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
# Keys that exist in HF checkpoints but carry no weight of ours: buffers and the decoder tied to the embeddings.
_IGNORABLE_SUFFIXES = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    "predictions.decoder.weight",
    "predictions.decoder.bias",
    "generator_lm_head.weight",
    "lm_head.decoder.weight",
    "lm_head.decoder.bias",
)
_ROBERTA = "roberta-prelayernorm"


def _prefix(model_type: str) -> str:
    """The encoder's key prefix in ``model_type``'s checkpoints (transformers' ``base_model_prefix``)."""
    return model_type.replace("-", "_")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: wrong shapes, missing files, unreadable weights."""


@dataclass
class LoadingInfo:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


# Key maps ---------------------------------------------------------------------------------------------------------
def _layer_names(model_type: str, layer: int) -> dict[str, str]:
    """Our per-layer module names -> the checkpoint's, for one layer."""
    if model_type == "albert":
        p = f"encoder.albert_layer_groups.{layer}.albert_layers.0."
        return {
            "attn_out": p + "attention.dense",
            "attn_norm": p + "attention.LayerNorm",
            "ffn_in": p + "ffn",
            "ffn_out": p + "ffn_output",
            "ffn_norm": p + "full_layer_layer_norm",
            "qkv": p + "attention.{}",
        }
    p = f"encoder.layer.{layer}."
    if model_type == _ROBERTA:  # pre-LN: each LayerNorm sits at the start of its block
        return {
            "attn_out": p + "attention.output.dense",
            "attn_norm": p + "attention.LayerNorm",
            "ffn_in": p + "intermediate.dense",
            "ffn_out": p + "output.dense",
            "ffn_norm": p + "intermediate.LayerNorm",
            "qkv": p + "attention.self.{}",
        }
    return {
        "attn_out": p + "attention.output.dense",
        "attn_norm": p + "attention.output.LayerNorm",
        "ffn_in": p + "intermediate.dense",
        "ffn_out": p + "output.dense",
        "ffn_norm": p + "output.LayerNorm",
        "qkv": p + "attention.self.{}",
    }


def _module_map(model_type: str, config: BertConfig) -> dict[str, str | tuple[str, ...]]:
    """Our module paths (relative to the encoder model, or ``head:`` for head modules) -> checkpoint paths.

    A tuple value means our module is the concatenation of several checkpoint modules along dim 0 (fused QKV).
    """
    albert, electra = model_type == "albert", model_type == "electra"
    m: dict[str, str | tuple[str, ...]] = {
        "embeddings.word_embeddings": "embeddings.word_embeddings",
        "embeddings.position_embeddings": "embeddings.position_embeddings",
        "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
        "embeddings.norm": "embeddings.LayerNorm",
        "embeddings.projection": "embeddings_project" if electra else "encoder.embedding_hidden_mapping_in",
        "pooler.dense": "pooler" if albert else "pooler.dense",
    }
    for i in range(1 if config.share_layers else config.num_hidden_layers):
        for ours, theirs in _layer_names(model_type, i).items():
            m[f"encoder.layers.{i}.{ours}"] = (
                tuple(theirs.format(x) for x in ("query", "key", "value")) if ours == "qkv" else theirs
            )
    if model_type == _ROBERTA:
        m["encoder.final_norm"] = "LayerNorm"
    pred = "predictions." if albert else "generator_predictions." if electra else "cls.predictions."
    roberta = model_type == _ROBERTA
    m.update(
        {
            "head:cls.transform": "lm_head.dense"
            if roberta
            else pred + ("dense" if albert or electra else "transform.dense"),
            "head:cls.transform_norm": "lm_head.layer_norm"
            if roberta
            else pred + ("LayerNorm" if albert or electra else "transform.LayerNorm"),
            "head:cls.sentence": "sop_classifier.classifier" if albert else "cls.seq_relationship",
            "head:classifier": "classifier",
            "head:qa_outputs": "qa_outputs",
        }
    )
    return m


def _base_prefix(model: torch.nn.Module) -> str:
    return "bert." if hasattr(model, "bert") else ""


def checkpoint_key_map(model: torch.nn.Module, model_type: str) -> dict[str, tuple[str, ...]]:
    """Each of the model's state_dict keys -> the checkpoint key(s) that hold it under ``model_type``'s layout.

    Encoder keys carry the ``bert.`` / ``albert.`` prefix; several keys mean a concatenation along dim 0 (our
    fused QKV is HF's query, key and value).
    """
    if model_type == "fastbert":
        return {k: (k,) for k in model.state_dict()}
    prefix = _base_prefix(model)
    modules = _module_map(model_type, model.config)
    out: dict[str, tuple[str, ...]] = {}
    for key in model.state_dict():
        if key == "cls.bias":
            bias = {"albert": "predictions.bias", "electra": "generator_lm_head.bias", _ROBERTA: "lm_head.bias"}
            out[key] = (bias.get(model_type, "cls.predictions.bias"),)
            continue
        module, _, leaf = key.rpartition(".")
        local = module[len(prefix) :] if module.startswith(prefix) else f"head:{module}"
        if local not in modules:
            # A module added to the model without an entry in _module_map: a bug here, named so it is found at once.
            raise CheckpointError(
                f"{type(model).__name__} key {key!r}: module {local!r} has no {model_type} checkpoint name in "
                "fastbert.hf._module_map"
            )
        theirs = modules[local]
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        base = _prefix(model_type) + "." if not local.startswith("head:") else ""
        out[key] = tuple(f"{base}{n}.{leaf}" for n in names)
    return out


# Loading ----------------------------------------------------------------------------------------------------------
def read_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    directory = Path(directory)
    st, pt = directory / SAFETENSORS_NAME, directory / PYTORCH_NAME
    if st.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(st)), st
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{st}: cannot read safetensors file: {e}") from e
    if pt.exists():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pt}: cannot read checkpoint (weights_only=True): {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{pt}: expected a state dict, got {type(state).__name__}")
        return state, pt
    raise CheckpointError(f"{directory}: no {SAFETENSORS_NAME} or {PYTORCH_NAME} found")


def _normalize_keys(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Give every encoder key the ``<model_type>.`` prefix and rename TF-era ``gamma``/``beta``."""
    if model_type == "fastbert":
        return dict(state)
    out = {}
    head_roots = ("cls.", "predictions.", "sop_classifier.", "classifier.", "qa_outputs.")
    head_roots += ("generator_predictions.", "generator_lm_head.", "discriminator_predictions.")  # ELECTRA's
    head_roots += ("lm_head.",)  # RoBERTa's
    prefix = _prefix(model_type)
    for key, value in state.items():
        if key.endswith(".gamma"):
            key = key[:-6] + ".weight"
        elif key.endswith(".beta"):
            key = key[:-5] + ".bias"
        if not key.startswith((prefix + ".", *head_roots)):
            key = f"{prefix}.{key}"
        out[key] = value
    return out


def load_state_dict_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], model_type: str, source: str = "checkpoint"
) -> LoadingInfo:
    """Copy a checkpoint's weights into ``model``; every shape is checked before anything is copied."""
    state = _normalize_keys(state, model_type)
    sources = checkpoint_key_map(model, model_type)
    ours = model.state_dict()
    info, errors, updates, used = LoadingInfo(), [], {}, set()
    for key, names in sources.items():
        present = [n for n in names if n in state]
        if not present:
            info.missing_keys.append(key)
            continue
        if len(present) != len(names):
            errors.append(f"{key}: the checkpoint has {present} but not {sorted(set(names) - set(present))}")
            continue
        used.update(names)
        value = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
        if key.endswith("embeddings.position_embeddings.weight"):
            value = value[model.config.position_offset :] if model_type == _ROBERTA else value
        if value.shape != ours[key].shape:
            shown = names[0] if len(names) == 1 else "+".join(names)
            errors.append(f"{shown}: checkpoint shape {tuple(value.shape)} != model shape {tuple(ours[key].shape)}")
            continue
        updates[key] = value
    if errors:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}; nothing was loaded:\n  " + "\n  ".join(errors)
        )
    info.unexpected_keys = sorted(k for k in state if k not in used and not k.endswith(_IGNORABLE_SUFFIXES))
    with torch.no_grad():
        for key, value in updates.items():
            ours[key].copy_(value)
    return info


def load_pretrained(
    cls, directory, config: BertConfig | None = None, output_loading_info: bool = False, **config_overrides
):
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    raw = BertConfig.read_json(config_path)
    model_type = raw.get("model_type", "bert")
    if config is None:
        config = BertConfig.from_dict(raw, source=str(config_path))
    if config_overrides:
        config = config.replace(**config_overrides)
    state, path = read_state_dict(directory)
    model = cls(config)
    info = load_state_dict_into(model, state, model_type, source=str(path))
    warn_if_partly_loaded(cls, path, info)
    return (model, info) if output_loading_info else model


def warn_if_partly_loaded(cls: type, path, info: LoadingInfo) -> None:
    """Warn, from the ``from_pretrained`` that called, about weights newly initialised or left unused."""
    if info.missing_keys or info.unexpected_keys:
        warnings.warn(
            f"loading {cls.__name__} from {path}: newly initialised (missing) {info.missing_keys}; "
            f"unused (unexpected) {info.unexpected_keys}",
            stacklevel=4,
        )


# Saving -----------------------------------------------------------------------------------------------------------
def export_model_type(model: torch.nn.Module) -> str:
    """The ``model_type`` ``model`` is saved as: its config's ``hf_model_type``, except that RoBERTa-PreLayerNorm
    holds only a bare encoder or an MLM-only pretraining model (its task heads are shaped otherwise)."""
    model_type = model.config.hf_model_type
    if model_type == _ROBERTA and type(model).__name__ not in ("BertModel", "BertForPreTraining"):
        return "fastbert"
    return model_type


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the key names of its ``export_model_type``; QKV split back into three."""
    model_type = export_model_type(model)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, names in checkpoint_key_map(model, model_type).items():
        parts = state[key].chunk(len(names)) if len(names) > 1 else (state[key],)
        if model_type == _ROBERTA and key.endswith("embeddings.position_embeddings.weight"):
            # RoBERTa's positions start after the padding row: rows 0..pad_token_id are never used by real tokens.
            parts = (torch.cat([parts[0].new_zeros(model.config.position_offset, parts[0].shape[1]), parts[0]]),)
        for name, part in zip(names, parts, strict=False):
            out[name] = part.detach().contiguous().cpu()
    if model_type != "fastbert" and not hasattr(model, "bert"):
        out = {k[len(_prefix(model_type)) + 1 :]: v for k, v in out.items()}  # a bare encoder: saved without prefix
    return out


_ARCHITECTURES = {
    ("bert", "BertForPreTraining", "none"): "BertForMaskedLM",
    (_ROBERTA, "BertForPreTraining", "none"): "RobertaPreLayerNormForMaskedLM",
    (_ROBERTA, "BertModel", "none"): "RobertaPreLayerNormModel",
    ("albert", "BertForPreTraining", "sop"): "AlbertForPreTraining",
    ("albert", "BertForPreTraining", "none"): "AlbertForMaskedLM",
}


def write_checkpoint(directory: str | os.PathLike, state: dict[str, torch.Tensor], config_json: str) -> None:
    """``directory/model.safetensors`` (``state``) and ``directory/config.json`` (``config_json``), each written
    atomically; the directory is made if missing."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / SAFETENSORS_NAME, save(state, metadata={"format": "pt"}))
    write_atomic(directory / "config.json", (config_json.rstrip("\n") + "\n").encode())


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    from safetensors.torch import save

    directory = Path(directory)
    config = model.config
    name = type(model).__name__
    model_type = export_model_type(model)
    arch = _ARCHITECTURES.get((model_type, name, config.sentence_objective))
    if arch is None:
        arch = name.replace("Bert", "Albert") if model_type == "albert" else name
    if model_type == "bert" and name == "BertForPreTraining" and config.sentence_objective == "sop":
        warnings.warn(
            "transformers' BertForPreTraining calls the SOP head 'seq_relationship'; it loads, but the "
            "label means 'swapped', not 'next'",
            stacklevel=3,
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / SAFETENSORS_NAME, save(hf_state_dict(model), metadata={"format": "pt"}))
    config.save_pretrained(directory, architecture=arch, model_type=model_type)
