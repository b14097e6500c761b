"""Optimizers and learning-rate schedules: LAMB (ZeRO-aware) with warmup + polynomial decay."""

from fastbert.optim.lamb import Lamb, parameter_groups, warmup_poly_lr

__all__ = ["Lamb", "parameter_groups", "warmup_poly_lr"]
