"""Optimizers and learning-rate schedules: LAMB (ZeRO-aware) with warmup + polynomial decay."""

from fastbert.optim.lamb import Lamb
from fastbert.optim.param_groups import parameter_groups
from fastbert.optim.schedule import warmup_poly_lr

__all__ = ["Lamb", "parameter_groups", "warmup_poly_lr"]
