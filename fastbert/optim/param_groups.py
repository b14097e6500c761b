"""Which parameters decay: the optimizer parameter groups of BERT's recipe, for LAMB and AdamW alike."""

from __future__ import annotations

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights that decay, and biases and LayerNorm parameters that do not (BERT's recipe).

    A model may name more parameters that take no decay in a ``no_weight_decay()`` method (as timm's models do): a
    matrix that starts at zero belongs there, since LAMB's trust ratio ``||w|| / ||update||`` lets a decaying tensor's
    norm grow by at most a factor ``1 + lr`` a step, which keeps a zero start near zero for a whole short run."""
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") or name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
