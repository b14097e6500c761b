"""One pretraining optimizer step: micro-batches onto the engine's device, the split-invariant loss, and the step's
metrics summed on the device.

The MLM loss of a step is the sum over every masked token of the global batch divided by the global batch's count of
masked tokens, and the sentence loss likewise over sentences. The counts are all-reduced before the first micro-batch,
and each micro-batch's mean is reweighted by its share of them, so micro-batch size, gradient accumulation and world
size never change the objective. (transformers and NVIDIA's recipe average per-micro-batch means instead, which
weights a token by how few masked tokens happen to share its micro-batch.) DeepSpeed divides each micro-batch's loss
by the accumulation steps and averages gradients over the data-parallel ranks; the weights undo both.

ELECTRA adds the discriminator's binary cross-entropy, a mean over the real tokens: it is reweighted by the global
batch's count of real tokens the same way, times lambda.

Device discipline: a batch crosses to ``engine.device`` here and nowhere else; the two collectives of a step (counts
before, metric sums after) run on tensors on that device; nothing in the micro-step reads a value back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from fastbert.ops import upload
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
    "replacement_keys",
)
# What a step sums over micro-batches and ranks (one all-reduce): loss sums and correct predictions weighted by
# their counts, the counts, tokens and sequences for throughput and FLOPs, two flags any rank may raise, rank 0's
# clock (seconds into the run; the other ranks add 0), so that every rank takes the same --budget rate, and rank 0's
# verdict that the budget is spent; then ELECTRA's
# discriminator: its loss sum over real tokens and its counts (zero for MLM); last, rank 0's gradient norm (nan when
# the step was skipped), from the optimizer's device report.
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
    "clock",
    "budget_spent",
    "discriminator_loss",
    "discriminator_correct",
    "replaced_detected",
    "predicted_replaced",
    "replaced",
    "grad_norm",
)


def counts(batch: dict) -> tuple[int, int, int]:
    """(masked tokens, sentence labels, real tokens) of a collated (unpadded) micro-batch, read from its host
    tensors."""
    sentences = batch["next_sentence_label"].numel() if "next_sentence_label" in batch else 0
    return batch["masked_positions"].numel(), sentences, batch["input_ids"].numel()


def optimizer_step(
    engine,
    micro_batches: Sequence[dict],
    world_size: int,
    skipped: Callable[[], bool | torch.Tensor],
    stop: bool = False,
    out_of_time: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = lambda: 0.0,
    budget_spent: Callable[[], bool] = lambda: False,
    grad_norm: Callable[[], float | torch.Tensor] = lambda: 0.0,
    all_reduce: Callable = dist.all_reduce,
) -> torch.Tensor:
    """Run the micro-batches of one optimizer step through ``engine`` (forward, backward, ``step``); returns the
    ``SUMS`` over every micro-batch and rank, a float64 tensor on ``engine.device``.

    ``skipped()`` says, after the last ``engine.step()``, whether this rank's optimizer skipped the update (a bool,
    or a 0-dim device tensor, 1 for skipped, so that it is read with the sums), and
    ``out_of_time()`` whether its time budget is spent; ``stop`` whether a signal asked this rank to stop; ``clock()``
    this rank's share of the shared clock (rank 0: its seconds into the run, the others: 0) and ``budget_spent()``
    whether rank 0 ends a ``--budget`` run here (the others: False); ``grad_norm()`` this rank's share of the
    gradient norm (rank 0: the norm, a device tensor or a number; the others: 0).
    ``all_reduce`` is the collective (a parameter so tests can check devices).
    """
    device = engine.device
    local = [counts(b) for b in micro_batches]
    masked_here, sentences_here, tokens_here = (sum(c[i] for c in local) for i in range(3))
    totals = upload(torch.tensor([masked_here, sentences_here, tokens_here], dtype=torch.float64), device)
    all_reduce(totals)
    # d(loss)/d(weights) summed by DeepSpeed over accumulation (each divided by it) and ranks (averaged).
    weight = totals.clamp(min=1).reciprocal().mul_(len(micro_batches) * world_size)
    found = torch.zeros(4, dtype=torch.float64, device=device)  # loss and correct sums, MLM then sentence
    detection = torch.zeros(5, dtype=torch.float64, device=device)  # ELECTRA's discriminator (SUMS' last five)
    for batch, (masked, sentences, tokens) in zip(micro_batches, local, strict=True):
        out = engine(**to_device(batch, device, MODEL_INPUTS))
        loss = out.mlm_loss * (weight[0] * masked).to(out.mlm_loss.dtype)
        found[:2] += torch.stack([out.mlm_loss.detach(), out.mlm_accuracy]).double() * masked
        if out.sentence_loss is not None:
            loss = loss + out.sentence_loss * (weight[1] * sentences).to(out.sentence_loss.dtype)
            found[2:] += torch.stack([out.sentence_loss.detach(), out.sentence_accuracy]).double() * sentences
        discriminator_loss = getattr(out, "discriminator_loss", None)
        if discriminator_loss is not None:  # a mean over real tokens, weighted by lambda
            scale = weight[2] * (tokens * out.discriminator_weight)
            loss = loss + discriminator_loss * scale.to(discriminator_loss.dtype)
            detection[0] += discriminator_loss.detach().double() * tokens
            detection[1:] += out.discriminator_counts
        engine.backward(loss)
        engine.step()
    lengths = [b["cu_seqlens"].diff() for b in micro_batches]
    host = upload(
        torch.tensor(
            [
                masked_here,
                sentences_here,
                sum(b["input_ids"].numel() for b in micro_batches),
                sum(x.numel() for x in lengths),
                sum(int(x.square().sum()) for x in lengths),
                0.0,  # skipped: added below, on the device
                float(stop),
                float(out_of_time()),
                float(clock()),
                float(budget_spent()),
            ],
            dtype=torch.float64,
        ),
        device,
    )
    flags = torch.stack([_on_device(f(), device) for f in (skipped, grad_norm)])
    sums = torch.cat([found[:2], host[:1], found[2:], host[1:], detection, flags[1:]])
    sums[SUMS.index("skipped")] += flags[0]
    all_reduce(sums)
    return sums


def step_metrics(s: dict[str, float], sentence_objective: bool, discriminator_weight: float | None = None) -> dict:
    """Losses and accuracies of a step from its ``SUMS`` read back to the host (name -> value); with
    ``discriminator_weight`` (lambda) those of an ELECTRA step."""
    masked, sentences = max(s["masked"], 1.0), max(s["sentences"], 1.0)
    if discriminator_weight is not None:
        return electra_metrics(s, discriminator_weight)
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


def electra_metrics(s: dict[str, float], discriminator_weight: float) -> dict:
    """An ELECTRA step's metrics: the generator's MLM loss and accuracy over masked tokens, the discriminator's loss
    and accuracy over real tokens, and its precision and recall on the replaced ones (1 where nothing was predicted
    replaced or nothing was replaced: no prediction was wrong)."""
    masked, tokens = max(s["masked"], 1.0), max(s["tokens"], 1.0)
    generator_loss, discriminator_loss = s["mlm_loss"] / masked, s["discriminator_loss"] / tokens
    return {
        "loss": generator_loss + discriminator_weight * discriminator_loss,
        "generator_loss": generator_loss,
        "generator_accuracy": s["mlm_correct"] / masked,
        "discriminator_loss": discriminator_loss,
        "discriminator_accuracy": s["discriminator_correct"] / tokens,
        "discriminator_precision": s["replaced_detected"] / s["predicted_replaced"] if s["predicted_replaced"] else 1.0,
        "discriminator_recall": s["replaced_detected"] / s["replaced"] if s["replaced"] else 1.0,
        "replaced_fraction": s["replaced"] / tokens,
    }


def _on_device(value, device: torch.device) -> torch.Tensor:
    """A device tensor or a host number as a float64 tensor on ``device``, without waiting for the device."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return upload(torch.tensor(float(value), dtype=torch.float64), device)
