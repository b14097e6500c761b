"""The learning-rate schedules of BERT pretraining and fine-tuning: linear warmup, then polynomial decay, by step
or by the elapsed share of a time budget (and the budget's parsing).

Pure functions of the step (and of the clock), so a resumed run recomputes its rate instead of restoring a
scheduler's state.
"""

from __future__ import annotations

import math
import re


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


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_BUDGET = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*([a-z]*)\s*$")


def parse_budget(text: str) -> float:
    """A time budget such as ``90s``, ``10m``, ``1.5h`` (or a plain number of seconds) in seconds."""
    match = _BUDGET.match(text.lower())
    if match is None:
        raise ValueError(f"budget {text!r}: not a number followed by s, m or h (e.g. 90s, 10m, 2h)")
    number, unit = match.groups()
    if unit not in ("", *_UNITS):
        raise ValueError(f"budget {text!r}: unknown unit {unit!r} (use s, m or h, e.g. 90s, 10m, 2h)")
    seconds = float(number) * _UNITS.get(unit, 1.0)
    if seconds <= 0:
        raise ValueError(f"budget {text!r}: must be a positive duration")
    return seconds


def budget_lr(step: int, fraction: float, base_lr: float, warmup: float, power: float = 1.0) -> float:
    """Learning rate for optimizer step ``step`` when ``fraction`` of a time budget has elapsed (Cramming's choice:
    the schedule follows the clock, so that it ends at the budget however fast the steps turn out to be).

    ``warmup`` below 1 is a fraction of the budget: linear warmup to ``base_lr`` over it, then polynomial decay to
    0 at the budget. ``warmup`` of 1 or more is a number of steps: a linear ramp over those steps times the
    polynomial decay by time from the start.
    """
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup >= 1:
        return base_lr * min(1.0, (step + 1) / warmup) * math.pow(1.0 - fraction, power)
    if fraction < warmup:
        return base_lr * max(fraction, 1e-3 * warmup) / warmup
    return base_lr * math.pow(1.0 - (fraction - warmup) / (1.0 - warmup), power)
