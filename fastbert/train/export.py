"""``fastbert export``: a training checkpoint -> consolidated fp32 weights in HF format (config.json,
model.safetensors, vocab.txt, tokenizer_config.json) that transformers loads. An ELECTRA run exports its
discriminator as ``ElectraForPreTraining`` there and its generator as ``ElectraForMaskedLM`` in ``generator/``, each
with the tokenizer files; a DeBERTa MLM run exports ``DebertaV2ForMaskedLM``, a DeBERTa ELECTRA run its
discriminator (``DebertaV2Model`` with its detection head) and its generator (``DebertaV2ForMaskedLM``, in
``generator/``).

The fp32 weights come from DeepSpeed's own consolidation (``zero_to_fp32``), which gathers the optimizer's fp32
partitions of every rank, so bf16 runs and ZeRO runs export their master weights, not a rounded copy. It loads
with ``weights_only=False``, so every file of the checkpoint first passes ``checkpoint.verify_safe``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fastbert import electra
from fastbert.config import BertConfig, read_model_config
from fastbert.deberta import DebertaConfig, DebertaForPreTraining
from fastbert.deberta_electra import DebertaElectraForPreTraining
from fastbert.model import BertForPreTraining
from fastbert.train import checkpoint


def consolidated_state_dict(ckpt: Path) -> dict:
    from fastbert.train.distributed import quiet_deepspeed

    quiet_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint.verify_manifest(ckpt)
    checkpoint.verify_safe(ckpt)  # zero_to_fp32 loads with weights_only=False
    if any(ckpt.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # No ZeRO partitions: the module weights are the fp32 weights.
    return checkpoint.load_weights_only(next(ckpt.glob("mp_rank_*_model_states.pt")))["module"]


def export(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    ckpt = checkpoint.resolve(source)
    config = read_model_config(ckpt / "config.json")
    if isinstance(config, DebertaConfig) and (ckpt / electra.GENERATOR_CONFIG).exists():
        generator = read_model_config(ckpt / electra.GENERATOR_CONFIG)
        model = DebertaElectraForPreTraining(config, generator)
    elif isinstance(config, DebertaConfig):
        model = DebertaForPreTraining(config)  # saved as transformers' DebertaV2ForMaskedLM
    elif (ckpt / electra.GENERATOR_CONFIG).exists():
        generator = BertConfig.from_json_file(ckpt / electra.GENERATOR_CONFIG)
        model = electra.ElectraForPreTraining(config, generator)
    else:
        model = BertForPreTraining(config)
    state = {k: v.float() for k, v in consolidated_state_dict(ckpt).items()}
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise checkpoint.CorruptCheckpoint(
            f"{ckpt}: non-finite weights (NaN or inf) in {', '.join(broken[:3])}"
            f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}; export an earlier checkpoint"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise checkpoint.CorruptCheckpoint(
            f"{ckpt}: weights do not match the checkpoint's config.json (missing {missing}, unexpected {unexpected})"
        )
    out = Path(out)
    model.save_pretrained(out)
    for name in ("vocab.txt", "tokenizer_config.json"):
        if (ckpt / name).exists():
            for directory in (out, out / "generator") if hasattr(model, "generator_head") else (out,):
                shutil.copyfile(ckpt / name, directory / name)
    return out
