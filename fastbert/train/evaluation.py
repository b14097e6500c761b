"""Held-out evaluation during pretraining: masked-LM (and NSP/SOP) loss and accuracy on data never trained on; for
ELECTRA the generator's MLM loss and accuracy and the discriminator's loss and accuracy.

The held-out set is a prepare-data directory with the run's vocabulary. Its masks are fixed: sample ``i`` is masked
as the training collator would mask it at epoch 0, so every evaluation (and every run with the same seed) scores the
same predictions. Each rank scores its share of the samples (``rank::world``); the sums are all-reduced on the
engine's device and read back once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from fastbert.train.distributed import to_device
from fastbert.train.step import MODEL_INPUTS, counts

# mlm loss sum, mlm correct, masked tokens, sentence loss sum, sentence correct, sentences; ELECTRA's discriminator
EVAL_SUMS = (
    "mlm_loss",
    "mlm_correct",
    "masked",
    "sentence_loss",
    "sentence_correct",
    "sentences",
    "discriminator_loss",
    "discriminator_correct",
    "tokens",
)


def held_out_batches(dataset, collate, batch_size: int, rank: int, world: int, limit: int | None) -> list[dict]:
    """This rank's evaluation batches, collated once (host tensors) and reused at every evaluation."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    mine = np.arange(rank, count, world)
    batches = []
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        batches.append(collate([dataset[int(i)] for i in indices], indices, np.zeros(len(indices), np.int64)))
    return batches


@torch.no_grad()
def evaluate(module, batches: list[dict], device: torch.device, all_reduce: Callable = dist.all_reduce) -> dict:
    """Loss and accuracy over every rank's held-out batches (``module`` in eval mode for the duration)."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(len(EVAL_SUMS), dtype=torch.float64, device=device)
    try:
        for batch in batches:
            masked, sentences, tokens = counts(batch)
            out = module(**to_device(batch, device, MODEL_INPUTS))
            sums[0] += out.mlm_loss.double() * masked
            sums[1] += out.mlm_accuracy.double() * masked
            sums[2] += masked
            if out.sentence_loss is not None:
                sums[3] += out.sentence_loss.double() * sentences
                sums[4] += out.sentence_accuracy.double() * sentences
                sums[5] += sentences
            if getattr(out, "discriminator_loss", None) is not None:
                sums[6] += out.discriminator_loss.double() * tokens
                sums[7] += out.discriminator_counts[0]
                sums[8] += tokens
    finally:
        module.train(was_training)
    all_reduce(sums)
    s = dict(zip(EVAL_SUMS, sums.tolist(), strict=True))  # the evaluation's one read back
    metrics = {
        "eval_mlm_loss": s["mlm_loss"] / max(s["masked"], 1.0),
        "eval_mlm_accuracy": s["mlm_correct"] / max(s["masked"], 1.0),
    }
    if s["sentences"]:
        metrics.update(
            eval_sentence_loss=s["sentence_loss"] / s["sentences"],
            eval_sentence_accuracy=s["sentence_correct"] / s["sentences"],
        )
    if s["tokens"]:
        metrics.update(
            eval_discriminator_loss=s["discriminator_loss"] / s["tokens"],
            eval_discriminator_accuracy=s["discriminator_correct"] / s["tokens"],
        )
    return metrics
