"""The learning-rate schedule of BERT pretraining and fine-tuning: linear warmup, then polynomial decay.

A pure function of the step, so a resumed run recomputes its rate instead of restoring a scheduler's state.
"""

from __future__ import annotations

import math


def warmup_poly_lr(step: int, base_lr: float, warmup: int, total: int, power: float = 1.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then polynomial decay to 0 at ``total``.

    ``power`` 1 is linear decay, 0.5 is NVIDIA's BERT LAMB schedule.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base_lr * math.pow(1.0 - progress, power)
