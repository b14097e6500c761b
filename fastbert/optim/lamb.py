"""LAMB as used to pretrain BERT, correct under DeepSpeed ZeRO-1/2.

Per parameter ``w`` with gradient ``g`` (after global gradient-norm clipping): Adam moments with bias correction,
``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` (decoupled decay; groups with ``weight_decay=0`` hold
biases and LayerNorm), trust ratio ``||w|| / ||update||`` (1 when either norm is 0, optionally clamped to
``max_trust_ratio``), then ``w -= lr * trust * update``.

Under ZeRO-1/2 DeepSpeed hands a client optimizer one flat fp32 partition per parameter group and rank, so a naive
LAMB computes one trust ratio per rank-sized slab of unrelated parameters. ``attach_zero_partitions`` reads where
each model parameter's fragment lies in this rank's partition (``param._hp_mapping``); each step then sums every
parameter's squared norms over its fragments, all-reduces them across the data-parallel group, and applies each
parameter's own trust ratio to its fragments: the same update as without ZeRO. ZeRO-3 partitions parameters
differently and is refused by the training driver.

A step whose gradients are not finite (checked together with the norms, so every rank agrees) is skipped: weights,
moments and the step count stay as they were; ``last_step_skipped`` tells the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Fragment:
    param_index: int  # the model parameter's index, the same on every rank
    start: int  # offset in the flat tensor the optimizer holds
    numel: int


class Lamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, max_grad_norm: float | None = 1.0,
                 max_trust_ratio: float | None = 10.0):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyperparameters: lr={lr}, betas={betas}, eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._fragments: dict[int, list[Fragment]] | None = None  # id(flat tensor) -> its fragments
        self._num_params = 0
        self._group = None
        self.last_step_skipped = False

    # ZeRO -----------------------------------------------------------------------------------------------------------
    def attach_zero_partitions(self, model_params: list[torch.nn.Parameter], process_group=None) -> None:
        """Learn each parameter's fragment in the flat partitions DeepSpeed ZeRO-1/2 gave this optimizer.

        Call after ``deepspeed.initialize``; ``model_params`` in the same order on every rank. Gradient clipping is
        then DeepSpeed's (``gradient_clipping`` in its config), since only it sees the whole gradient.
        """
        flats = {id(p): p for group in self.param_groups for p in group["params"]}
        fragments: dict[int, list[Fragment]] = {id(p): [] for p in flats.values()}
        for index, param in enumerate(model_params):
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue  # no fragment of this parameter on this rank
            flat = self.param_groups[mapping.param_group_index]["params"][0]
            address = mapping.hp_fragment_address
            fragments[id(flat)].append(Fragment(index, address.start, address.numel))
        self._fragments = fragments
        self._num_params = len(model_params)
        self._group = process_group
        self.max_grad_norm = None

    def _layout(self) -> tuple[dict[int, list[Fragment]], int]:
        if self._fragments is not None:
            return self._fragments, self._num_params
        fragments, index = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                fragments[id(p)] = [Fragment(index, 0, p.numel())]
                index += 1
        return fragments, index

    # The step -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        fragments, num_params = self._layout()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")

        # One all-reduce carries everything the ranks must agree on: the global gradient norm, a non-finite flag,
        # and each parameter's squared weight and update norms.
        grad_sq = sum((p.grad.float().square().sum() for p in params), torch.zeros((), device=device))
        finite = torch.isfinite(grad_sq)
        clip = 1.0
        if self.max_grad_norm is not None and bool(finite):
            norm = grad_sq.sqrt().item()
            clip = min(1.0, self.max_grad_norm / (norm + 1e-6))

        updates: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        sums = torch.zeros(2 * num_params + 1, device=device, dtype=torch.float32)
        sums[-1] = 0.0 if bool(finite) else 1.0
        if bool(finite):
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    step = state["step"] + 1
                    grad = p.grad.float() * clip
                    # Moments are only committed after the agreement below; compute the candidates.
                    m = state["exp_avg"] * beta1 + grad * (1 - beta1)
                    v = state["exp_avg_sq"] * beta2 + grad.square() * (1 - beta2)
                    update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])
                    if group["weight_decay"]:
                        update.add_(p.float(), alpha=group["weight_decay"])
                    updates[id(p)] = (update, m, v)
                    w_flat, u_flat = p.detach().float().view(-1), update.view(-1)
                    for f in fragments[id(p)]:
                        sums[2 * f.param_index] += w_flat.narrow(0, f.start, f.numel).square().sum()
                        sums[2 * f.param_index + 1] += u_flat.narrow(0, f.start, f.numel).square().sum()
        if self._fragments is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=self._group)
        self.last_step_skipped = bool(sums[-1] > 0)
        if self.last_step_skipped:
            return loss

        norms = sums[:-1].view(num_params, 2).sqrt()
        w_norm, u_norm = norms[:, 0], norms[:, 1]
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp(min=1e-30), torch.ones_like(w_norm))
        for group in self.param_groups:
            cap = group["max_trust_ratio"]
            group_trust = trust if cap is None else trust.clamp(max=cap)
            for p in group["params"]:
                if id(p) not in updates:
                    continue
                update, m, v = updates[id(p)]
                state = self.state[p]
                state["exp_avg"], state["exp_avg_sq"] = m, v
                state["step"] += 1
                u_flat = update.view(-1)
                for f in fragments[id(p)]:
                    u_flat.narrow(0, f.start, f.numel).mul_(group_trust[f.param_index])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights that decay, and biases and LayerNorm parameters that do not (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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
