"""Optimizers and learning-rate schedules: LAMB and AdamW (ZeRO-aware) with warmup + polynomial decay, by step or
by a time budget."""

from fastbert.optim.lamb import AdamW, Lamb
from fastbert.optim.param_groups import parameter_groups
from fastbert.optim.schedule import budget_lr, parse_budget, warmup_poly_lr

__all__ = ["AdamW", "Lamb", "budget_lr", "parameter_groups", "parse_budget", "warmup_poly_lr"]
