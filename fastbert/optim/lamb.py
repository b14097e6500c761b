"""LAMB as used to pretrain BERT, correct under DeepSpeed ZeRO-1/2.

Per parameter ``w`` with gradient ``g`` (after global gradient-norm clipping): Adam moments with bias correction,
``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w`` (decoupled decay; groups with ``weight_decay=0`` hold
biases and LayerNorm), trust ratio ``||w|| / ||update||`` (1 when either norm is 0, optionally clamped to
``max_trust_ratio``), then ``w -= lr * trust * update``.

Layer adaptation (the trust ratio) applies only to groups with weight decay, as in NVIDIA's LAMB (apex
``FusedLAMB``, ``use_nvlamb=False``, the optimizer of NVIDIA's BERT recipe), timm's (``always_adapt=False``) and
TensorFlow's (``exclude_from_layer_adaptation``): biases and LayerNorm take the plain Adam step. Scaled by
``||w|| / ||update||``, a tensor's norm can grow by at most a factor ``1 + lr`` a step, so a bias that starts at
zero would stay near zero through a short run. ``layer_adaptation="all"`` applies the ratio to every group (the LAMB
paper's algorithm as written, and fastbert's behaviour before), for comparison; ``"none"`` to no group, which is
AdamW (decoupled weight decay, Loshchilov and Hutter): ``AdamW`` below, with every guarantee of this class (ZeRO
fragments, clipping, skipped steps, the fused kernels).

Under ZeRO-1/2 DeepSpeed hands a client optimizer one flat fp32 partition per parameter group and rank, so a naive
LAMB computes one trust ratio per rank-sized slab of unrelated parameters. ``attach_to_engine`` looks at the
optimizer wrapper DeepSpeed built and, for the partitioned ones, reads where each model parameter's fragment lies in
this rank's partition (``param._hp_mapping``), checking that the ranks' fragments cover every parameter exactly once;
each step then sums every parameter's squared norms over its fragments, all-reduces them across the data-parallel
group, and applies each parameter's own trust ratio to its fragments: the same update as without ZeRO. What it
cannot map (ZeRO-3, a wrapper that flattens parameters without a fragment map) is refused with the reason.

Gradient clipping needs the whole gradient's norm. Without partitions LAMB sees it and clips (``max_grad_norm``);
under ZeRO-1/2 DeepSpeed steps one parameter group at a time, so only DeepSpeed's wrapper, which computes the norm
in float64 before stepping, can clip (``gradient_clipping`` in its config), and ``attach_to_engine`` turns LAMB's
clipping off. LAMB's squared norms are summed over 2048-element rows and in float64 across rows: torch's CPU
``norm`` and ``_foreach_norm`` accumulate a long vector with a relative error that grows with its length (2.5e-3
on the squared norm of a 23M-element embedding gradient), enough to move every update of a 30,522-word model.

A step whose gradients are not finite (the all-reduced squared norm is then not finite, so every rank agrees) is
skipped: weights, moments and the step count stay as they were; ``last_step_skipped`` tells the caller.

Nothing in a step is read back to the host: the gradient norm, the clip factor, the skip decision, the step counts
(``state["step"]``, a float64 0-dim tensor on the parameter's device, as ``torch.optim.Adam`` keeps its own) and
the trust ratios stay on the device, and a skipped step runs with rates that change nothing. ``step_report()``
hands the skip flag and the gradient norm to the training driver as a device tensor, to be read with the step's
other metrics; ``last_step_skipped`` and ``grad_norm`` read them when asked.

Two implementations of the same step, chosen as ``fastbert.ops`` chooses for every op: on CUDA (or with
``FASTBERT_BACKEND=triton``, which under ``TRITON_INTERPRET=1`` runs on CPU tensors) the fused Triton kernels of
``fastbert.kernels.lamb``: the squared gradient norm, then moments and per-chunk norm partials for all parameters in
one launch, per-parameter sums in a fixed order (all-reduced here under ZeRO), then trust ratio and weight update in
one launch, the update recomputed rather than stored. Otherwise, and for non-contiguous parameters, torch's foreach
ops. Both keep the same state (``step``, fp32 ``exp_avg`` and ``exp_avg_sq`` per tensor), so checkpoints move
between them; they agree to about 1e-6 relative (the fused path's gradient norm is the more exact of the two). The
fused path is deterministic (no atomics), so a resumed run on the same GPUs repeats bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastbert.ops import lamb_kernel, upload

_ROW = 2048  # elements per row of a squared-norm sum: short enough that fp32 accumulation within a row is exact


def square_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of squares of ``x`` as a float64 0-dim tensor, accurate at any length (see the module docstring)."""
    flat = x.detach().reshape(-1)
    whole = flat.numel() // _ROW * _ROW
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), dim=1, dtype=_master_dtype(flat.dtype))
    total = rows.double().square().sum()
    if whole < flat.numel():
        total = total + flat[whole:].double().square().sum()
    return total


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LAMB's math and moments use for parameters of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


# Which parameter groups take the trust ratio: those with weight decay (NVIDIA's LAMB), all (the paper), none (AdamW).
LAYER_ADAPTATION = ("decay", "all", "none")


class LambSetupError(ValueError):
    """DeepSpeed built an optimizer wrapper whose tensors LAMB cannot map back to whole parameters."""


@dataclass(frozen=True)
class Fragment:
    param_index: int  # the model parameter's index, the same on every rank
    start: int  # offset in the flat tensor the optimizer holds
    numel: int


class Lamb(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
        max_trust_ratio: float | None = 10.0,
        layer_adaptation: str = "decay",
    ):
        if layer_adaptation not in LAYER_ADAPTATION:
            raise ValueError(f"layer_adaptation must be one of {', '.join(LAYER_ADAPTATION)}, got {layer_adaptation!r}")
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LAMB hyperparameters: lr={lr}, betas={betas}, eps={eps}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None (no clipping), got {max_grad_norm}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.layer_adaptation = layer_adaptation  # which groups take the trust ratio (see the module docstring)
        self._fragments: dict[int, list[Fragment]] | None = None  # id(flat tensor) -> its fragments
        self._num_params = 0
        self._group = None
        self._plan = None  # the fused path's chunk tables and the layout they were built for
        self._skipped: torch.Tensor | None = None  # the last step's skip flag (0-dim bool, on the device)
        self._norm: torch.Tensor | None = None  # its gradient norm (0-dim float64, on the device; inf/nan: skipped)
        self.partitioned = False  # whether DeepSpeed handed this optimizer flat partitions (``attach_to_engine``)
        # The gradient norm before clipping (a device tensor), when this optimizer sees whole gradients (no ZeRO
        # partitions). The name is DeepSpeed's: its engine reads the attribute after each step for
        # ``get_global_grad_norm()``.
        self._global_grad_norm: torch.Tensor | None = None

    # ZeRO -----------------------------------------------------------------------------------------------------------
    def attach_to_engine(self, engine, model_params: list[torch.nn.Parameter]) -> None:
        """Map this optimizer's tensors to the model's parameters from what ``deepspeed.initialize`` built.

        Call right after it, with ``model_params`` in the same order on every rank. Without a partitioning wrapper
        DeepSpeed hands LAMB whole tensors (the parameters or same-shaped fp32 copies) and nothing is needed; ZeRO-1/2
        and DeepSpeed's BF16 optimizer hand it flat partitions, mapped through each parameter's ``_hp_mapping``.
        Anything else raises ``LambSetupError`` saying why. Sets ``partitioned``; when true, gradient clipping is
        DeepSpeed's (see the module docstring).
        """
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        wrapper = engine.optimizer
        name = type(wrapper).__name__
        if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
            raise LambSetupError(
                f"DeepSpeed built {name} (ZeRO-3): it partitions the parameters themselves, so LAMB's "
                "per-parameter trust ratio cannot be formed from a rank's shard; use ZeRO-1 or 2"
            )
        if isinstance(wrapper, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
            self.attach_zero_partitions(model_params, wrapper.dp_process_group)
            self._check_coverage(model_params, name)
            return
        own = sorted(tuple(p.shape) for g in self.param_groups for p in g["params"])
        model = sorted(tuple(p.shape) for p in model_params if p.requires_grad)
        if own != model:
            raise LambSetupError(
                f"DeepSpeed's {name} hands LAMB {len(own)} tensors that are not the model's "
                f"{len(model)} parameters and carry no fragment map, so LAMB's per-parameter trust "
                "ratio cannot be formed; run with --zero-stage 1 or 2, or fp32/bf16 without ZeRO"
            )

    def _check_coverage(self, model_params: list[torch.nn.Parameter], wrapper: str) -> None:
        """Every trainable parameter's fragments, over all ranks, add up to the whole parameter exactly once."""
        covered = torch.zeros(len(model_params), dtype=torch.float64)
        for fragments in self._fragments.values():
            for f in fragments:
                covered[f.param_index] += f.numel
        if dist.is_available() and dist.is_initialized():
            device = next(iter(self.param_groups[0]["params"])).device
            covered = covered.to(device)
            dist.all_reduce(covered, group=self._group)
            covered = covered.cpu()
        for index, p in enumerate(model_params):
            if p.requires_grad and covered[index] != p.numel():
                raise LambSetupError(
                    f"{wrapper}: the ranks' optimizer partitions hold {int(covered[index])} of the "
                    f"{p.numel()} elements of parameter {index} {tuple(p.shape)}; LAMB cannot map "
                    "this DeepSpeed version's partitions to parameters"
                )

    def attach_zero_partitions(self, model_params: list[torch.nn.Parameter], process_group=None) -> None:
        """Learn each parameter's fragment in the flat partitions DeepSpeed ZeRO-1/2 gave this optimizer
        (``attach_to_engine`` calls this when the engine's wrapper partitions)."""
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
        self.partitioned = True
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

    def _adapts(self, group: dict) -> bool:
        """Whether ``group``'s updates are scaled by their parameters' trust ratios."""
        if self.layer_adaptation == "decay":
            return group["weight_decay"] != 0
        return self.layer_adaptation == "all"

    def _exempt(
        self, groups: list[tuple[dict, list[torch.Tensor]]], fragments: dict[int, list[Fragment]], num_params: int
    ) -> torch.Tensor:
        """``[num_params]`` bool: the parameters this rank holds that take no trust ratio."""
        exempt = torch.zeros(num_params, dtype=torch.bool)
        for group, ps in groups:
            if not self._adapts(group):
                for p in ps:
                    for f in fragments[id(p)]:
                        exempt[f.param_index] = True
        return exempt

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped (non-finite gradients). Reads the device flag back to the host: a
        training loop on a GPU takes ``step_report()`` into its step's metrics instead."""
        return self._skipped is not None and bool(self._skipped)

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm before clipping of the last step, read back to the host; None before the first
        step, when it was not finite, or under ZeRO partitions (then ask DeepSpeed's engine, which computed it)."""
        if self._norm is None or self.partitioned:
            return None
        norm = float(self._norm)
        return norm if math.isfinite(norm) else None

    def step_report(self) -> torch.Tensor | None:
        """``[skipped (0 or 1), gradient norm (nan where not finite or under ZeRO partitions)]``, float64 on the
        device, for the last step; None before the first. Nothing is read back."""
        if self._skipped is None:
            return None
        norm = self._norm if not self.partitioned else torch.full_like(self._norm, math.nan)
        norm = torch.where(self._skipped, torch.full_like(norm, math.nan), norm)
        return torch.stack([self._skipped.to(torch.float64), norm])

    # The step -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        fragments, num_params = self._layout()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        if not params:
            return loss
        kernel = lamb_kernel(params[0])
        if kernel is not None and all(p.is_contiguous() for p in params):
            self._fused_step(kernel, groups, fragments, num_params)
        else:
            self._foreach_step(groups, fragments, num_params)
        return loss

    def _clip_factor(self, local_sq: torch.Tensor) -> torch.Tensor:
        """The clip factor (float64, 0-dim, on the device; 0 for a step to skip) from this rank's squared gradient
        sum, all-reduced under ZeRO so that every rank agrees. Records the norm and the skip flag. Without
        partitions the norm is the global gradient norm, kept as ``_global_grad_norm`` (DeepSpeed's
        ``get_global_grad_norm`` reads it); under ZeRO, one group's."""
        total = local_sq.reshape(1).double()
        self._all_reduce_sums(total)
        norm = total.sqrt().reshape(())
        finite = torch.isfinite(norm)
        self._norm, self._skipped = norm, ~finite
        self._global_grad_norm = None if self.partitioned else norm
        clip = (
            torch.ones_like(norm) if self.max_grad_norm is None else (self.max_grad_norm / (norm + 1e-6)).clamp(max=1)
        )
        return torch.where(finite, clip, torch.zeros_like(clip))

    def _count_step(self, params: list[torch.Tensor], clip: torch.Tensor) -> list[torch.Tensor]:
        """Adds 1 to each parameter's step count unless the step is skipped (``clip`` 0); returns the counts."""
        steps = [self._state_for(p)["step"] for p in params]
        torch._foreach_add_(
            steps, [(clip != 0).to(torch.float64)] * len(steps)
        )  # a list: a lone 0-dim tensor would be read as a number
        return steps

    def _all_reduce_sums(self, sums: torch.Tensor) -> None:
        if self._fragments is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, group=self._group)

    def _fused_step(
        self,
        kernel,
        groups: list[tuple[dict, list[torch.Tensor]]],
        fragments: dict[int, list[Fragment]],
        num_params: int,
    ) -> None:
        """The step in four Triton launches (``fastbert.kernels.lamb``): gradient norm, moments and per-chunk
        norms, per-parameter sums (all-reduced here under ZeRO), trust ratio and weight update."""
        params = [p for _, ps in groups for p in ps]
        device = params[0].device
        grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
        layouts = tuple(
            kernel.TensorLayout(
                p.numel(), p.dtype, g.dtype, tuple((f.param_index, f.start, f.numel) for f in fragments[id(p)])
            )
            for p, g in zip(params, grads, strict=True)
        )
        adapts = tuple(self._adapts(group) for group, _ in groups)
        key = (layouts, num_params, device, adapts)
        if self._plan is None or self._plan[0] != key:  # the chunk tables depend on the layout only
            exempt = self._exempt(groups, fragments, num_params).to(device)
            self._plan = (key, kernel.plan_chunks(layouts, num_params, device), exempt)
        _, plan, exempt = self._plan
        clip = self._clip_factor(kernel.grad_square_sum(plan, grads))
        steps = torch.stack(self._count_step(params, clip))
        constants = [
            (
                group["lr"],
                *group["betas"],
                group["eps"],
                group["weight_decay"],
                group["max_trust_ratio"] if self._adapts(group) else None,
            )
            for group, ps in groups
            for _ in ps
        ]
        # A skipped step (clip 0) runs with rates that leave weights and moments as they were.
        hyper = kernel.hyperparameter_table(upload(kernel.constants_table(constants), device), steps, clip)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        sums = kernel.moments_and_norms(plan, params, grads, exp_avgs, exp_avg_sqs, hyper)
        self._all_reduce_sums(sums)
        # A zero weight norm is a trust ratio of 1 to the kernel: the plain Adam step for the exempt parameters.
        sums[:, 0].masked_fill_(exempt, 0.0)
        kernel.apply_update(plan, params, exp_avgs, exp_avg_sqs, hyper, sums)

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update(
                step=torch.zeros((), dtype=torch.float64, device=p.device),
                exp_avg=torch.zeros_like(p, dtype=_master_dtype(p.dtype)),
                exp_avg_sq=torch.zeros_like(p, dtype=_master_dtype(p.dtype)),
            )
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.dtype != torch.float64 or step.device != p.device:
            # A checkpoint of an earlier version (a Python int) or one loaded onto another device.
            state["step"] = torch.as_tensor(step, dtype=torch.float64).to(p.device)
        return state

    def _foreach_step(
        self, groups: list[tuple[dict, list[torch.Tensor]]], fragments: dict[int, list[Fragment]], num_params: int
    ) -> None:
        """The step with torch's multi-tensor (foreach) ops: the definition the fused path is tested against."""
        params = [p for _, ps in groups for p in ps]
        device = params[0].device
        grads = {id(p): p.grad.to(_master_dtype(p.dtype)) for p in params}
        local_sq = sum(
            (
                square_sum(grads[id(p)].reshape(-1).narrow(0, f.start, f.numel))
                for p in params
                for f in fragments[id(p)]
            ),
            torch.zeros((), dtype=torch.float64, device=device),  # a ZeRO rank may hold no fragment in this group
        )
        clip = self._clip_factor(local_sq)
        updates, sums = self._foreach_updates_and_norms(groups, grads, clip, fragments, num_params, device)
        self._all_reduce_sums(sums)
        self._foreach_apply_trust_ratios(groups, updates, sums, fragments, num_params, clip)

    def _foreach_updates_and_norms(
        self,
        groups: list[tuple[dict, list[torch.Tensor]]],
        grads: dict[int, torch.Tensor],
        clip: torch.Tensor,
        fragments: dict[int, list[Fragment]],
        num_params: int,
        device: torch.device,
    ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """Moments and raw updates per group, then every parameter's squared weight and update norms from this
        rank's fragments: ``sums[2 * i]`` and ``sums[2 * i + 1]`` for parameter ``i``, not yet all-reduced. A skipped
        step (``clip`` 0) reads its gradients as zeros and moves the moments by 0, so they stay as they were."""
        sums = torch.zeros(2 * num_params, device=device, dtype=torch.float64)
        updates: list[list[torch.Tensor]] = []
        taken = clip != 0
        for group, ps in groups:
            if not ps:  # a ZeRO rank may hold no fragment in this group
                updates.append([])
                continue
            beta1, beta2 = group["betas"]
            steps = torch.stack(self._count_step(ps, clip)).clamp(min=1)
            # Device scalars in the moments' dtype, rounded from float64 once, as Python numbers would be.
            dtype = _master_dtype(ps[0].dtype)
            g = [torch.where(taken, grads[id(p)], 0.0) for p in ps]
            torch._foreach_mul_(g, clip.to(dtype))
            m = [self.state[p]["exp_avg"] for p in ps]
            v = [self.state[p]["exp_avg_sq"] for p in ps]
            rates = upload(torch.tensor([1 - beta1, beta2, 0.0, 1.0], dtype=torch.float64), device)
            rates = torch.where(taken, rates[:2], rates[2:]).to(dtype)
            torch._foreach_lerp_(m, g, [rates[0]] * len(m))  # a list: a lone 0-dim weight would be read as a number
            torch._foreach_mul_(v, rates[1])
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)  # adds zeros on a skipped step
            betas = upload(torch.tensor([beta1, beta2], dtype=torch.float64), device)
            corrections = (1 - betas[:, None].pow(steps)).to(dtype)  # bias corrections from the device step counts
            denom = torch._foreach_div(v, list(corrections[1].unbind()))
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, group["eps"])
            u = torch._foreach_div(m, list(corrections[0].unbind()))
            torch._foreach_div_(u, denom)
            if group["weight_decay"]:
                torch._foreach_add_(u, [p.to(_master_dtype(p.dtype)) for p in ps], alpha=group["weight_decay"])
            updates.append(u)
            for p, up in zip(ps, u, strict=True):
                w_flat, u_flat = p.detach().to(_master_dtype(p.dtype)).reshape(-1), up.reshape(-1)
                for f in fragments[id(p)]:
                    sums[2 * f.param_index] += square_sum(w_flat.narrow(0, f.start, f.numel))
                    sums[2 * f.param_index + 1] += square_sum(u_flat.narrow(0, f.start, f.numel))
        return updates, sums

    def _foreach_apply_trust_ratios(
        self,
        groups: list[tuple[dict, list[torch.Tensor]]],
        updates: list[list[torch.Tensor]],
        sums: torch.Tensor,
        fragments: dict[int, list[Fragment]],
        num_params: int,
        clip: torch.Tensor,
    ) -> None:
        """``w -= lr * trust * update``, each fragment of an adapting group scaled by its parameter's trust ratio from
        the all-reduced ``sums``; times 0 on a skipped step (``clip`` 0). The ratios stay on the device: no host
        read."""
        norms = sums.view(num_params, 2).sqrt()
        w_norm, u_norm = norms[:, 0], norms[:, 1]
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm.clamp(min=1e-30), torch.ones_like(w_norm))
        taken = (clip != 0).to(trust.dtype)
        for (group, ps), u in zip(groups, updates, strict=True):
            if not u:
                continue
            if not self._adapts(group):
                torch._foreach_mul_(u, taken.to(u[0].dtype))
            else:
                cap = group["max_trust_ratio"]
                group_trust = ((trust if cap is None else trust.clamp(max=cap)) * taken).to(u[0].dtype)
                for p, up in zip(ps, u, strict=True):
                    if self._fragments is None:  # whole parameters (contiguous or not): one ratio each
                        up.mul_(group_trust[fragments[id(p)][0].param_index])
                        continue
                    u_flat = up.view(-1)  # a flat ZeRO partition
                    for f in fragments[id(p)]:
                        u_flat.narrow(0, f.start, f.numel).mul_(group_trust[f.param_index])
            torch._foreach_add_(ps, [x.to(p.dtype) for x, p in zip(u, ps, strict=True)], alpha=-group["lr"])


class AdamW(Lamb):
    """AdamW (decoupled weight decay) as LAMB without layer adaptation: ``w -= lr * (m_hat / (sqrt(v_hat) + eps) +
    weight_decay * w)``, the update ``torch.optim.AdamW`` makes, with LAMB's ZeRO mapping, clipping and skipping."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm, None, layer_adaptation="none")
