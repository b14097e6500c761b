"""One pretraining optimizer step: micro-batches onto the engine's device, the split-invariant loss, and the step's
metrics summed on the device.

The MLM loss of a step is the sum over every masked token of the global batch divided by the global batch's count of
masked tokens, and the sentence loss likewise over sentences. The counts are all-reduced before the first micro-batch,
and each micro-batch's mean is reweighted by its share of them, so micro-batch size, gradient accumulation and world
size never change the objective. (transformers and NVIDIA's recipe average per-micro-batch means instead, which
weights a token by how few masked tokens happen to share its micro-batch.) DeepSpeed divides each micro-batch's loss
by the accumulation steps and averages gradients over the data-parallel ranks; the weights undo both.

Device discipline: a batch crosses to ``engine.device`` here and nowhere else; the two collectives of a step (counts
before, metric sums after) run on tensors on that device; nothing in the micro-step reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from fastbert.train.distributed import to_device

MODEL_INPUTS = (
    "input_ids",
    "token_type_ids",
    "position_ids",
    "labels",
    "next_sentence_label",
    "cu_seqlens",
    "max_seqlen",
    "masked_positions",
)
# What a step sums over micro-batches and ranks (one all-reduce): loss sums and correct predictions weighted by
# their counts, the counts, tokens and sequences for throughput and FLOPs, and two flags any rank may raise.
SUMS = (
    "mlm_loss",
    "mlm_correct",
    "masked",
    "sentence_loss",
    "sentence_correct",
    "sentences",
    "tokens",
    "sequences",
    "squared_lengths",
    "skipped",
    "stop",
    "out_of_time",
)


def counts(batch: dict) -> tuple[int, int]:
    """(masked tokens, sentence labels) of a collated micro-batch, read from its host tensors."""
    sentences = batch["next_sentence_label"].numel() if "next_sentence_label" in batch else 0
    return batch["masked_positions"].numel(), sentences


def optimizer_step(
    engine,
    micro_batches: Sequence[dict],
    world_size: int,
    skipped: Callable[[], bool],
    stop: bool = False,
    out_of_time: Callable[[], bool] = lambda: False,
    all_reduce: Callable = dist.all_reduce,
) -> torch.Tensor:
    """Run the micro-batches of one optimizer step through ``engine`` (forward, backward, ``step``); returns the
    ``SUMS`` over every micro-batch and rank, a float64 tensor on ``engine.device``.

    ``skipped()`` says, after the last ``engine.step()``, whether this rank's optimizer skipped the update, and
    ``out_of_time()`` whether its time budget is spent; ``stop`` whether a signal asked this rank to stop.
    ``all_reduce`` is the collective (a parameter so tests can check devices).
    """
    device = engine.device
    local = [counts(b) for b in micro_batches]
    masked_here, sentences_here = sum(m for m, _ in local), sum(s for _, s in local)
    totals = torch.tensor([masked_here, sentences_here], dtype=torch.float64).to(device)
    all_reduce(totals)
    # d(loss)/d(weights) summed by DeepSpeed over accumulation (each divided by it) and ranks (averaged).
    weight = totals.clamp(min=1).reciprocal().mul_(len(micro_batches) * world_size)
    found = torch.zeros(4, dtype=torch.float64, device=device)  # loss and correct sums, MLM then sentence
    for batch, (masked, sentences) in zip(micro_batches, local, strict=True):
        out = engine(**to_device(batch, device, MODEL_INPUTS))
        loss = out.mlm_loss * (weight[0] * masked).to(out.mlm_loss.dtype)
        found[:2] += torch.stack([out.mlm_loss.detach(), out.mlm_accuracy]).double() * masked
        if out.sentence_loss is not None:
            loss = loss + out.sentence_loss * (weight[1] * sentences).to(out.sentence_loss.dtype)
            found[2:] += torch.stack([out.sentence_loss.detach(), out.sentence_accuracy]).double() * sentences
        engine.backward(loss)
        engine.step()
    lengths = [b["cu_seqlens"].diff() for b in micro_batches]
    host = torch.tensor(
        [
            masked_here,
            sentences_here,
            sum(b["input_ids"].numel() for b in micro_batches),
            sum(x.numel() for x in lengths),
            sum(int(x.square().sum()) for x in lengths),
            float(skipped()),
            float(stop),
            float(out_of_time()),
        ],
        dtype=torch.float64,
    ).to(device)
    sums = torch.cat([found[:2], host[:1], found[2:], host[1:]])
    all_reduce(sums)
    return sums


def step_metrics(s: dict[str, float], sentence_objective: bool) -> dict:
    """Losses and accuracies of a step from its ``SUMS`` read back to the host (name -> value)."""
    masked, sentences = max(s["masked"], 1.0), max(s["sentences"], 1.0)
    metrics = {
        "loss": s["mlm_loss"] / masked + (s["sentence_loss"] / sentences if sentence_objective else 0.0),
        "mlm_loss": s["mlm_loss"] / masked,
        "mlm_accuracy": s["mlm_correct"] / masked,
    }
    if sentence_objective:
        metrics.update(
            sentence_loss=s["sentence_loss"] / sentences, sentence_accuracy=s["sentence_correct"] / sentences
        )
    return metrics
