"""Fused multi-tensor LAMB step in Triton: every parameter the optimizer holds, in a handful of launches.

Owns the kernels, the chunk plan they walk, the host launchers and a per-fragment torch reference. What a step
means (Adam moments with bias correction, decoupled weight decay, per-parameter trust ratio, gradient clipping,
skipping non-finite steps, ZeRO fragments and their all-reduce) is ``fastbert.optim.lamb``'s business; this module
only computes it.

Multi-tensor: each step's tensors are described by an address table (int64 data pointers of weight, gradient and
the two fp32 moments, cast to typed pointers inside the kernel), and the work by a cached chunk table: every
program takes one chunk of at most ``CHUNK`` elements of one tensor, and a chunk never straddles two fragments
(parameters), so its partial sums belong to one parameter. Chunk boundaries fall on multiples of ``CHUNK`` of
their tensor: a full chunk of 16-byte aligned tensors takes the unmasked path with vector loads. Weight and
gradient dtypes are constexprs, so there is one launch per (weight dtype, gradient dtype) pair present, in
practice one.

A step is four kernels, each deterministic (no atomics; fixed summation order), so that resuming from a
checkpoint reproduces a run bit for bit:
1. ``_lamb_grad_squares``: per chunk, the sum of squared gradients; summed (kernel 3) into the global squared
   norm the caller uses for the finiteness check and the clip factor.
2. ``_lamb_moments``: clip, update ``exp_avg``/``exp_avg_sq`` in place, form the update
   ``u = m_hat / (sqrt(v_hat) + eps) + wd * w`` and write per-chunk partial sums of ``w^2`` and ``u^2``.
3. ``_lamb_segment_sums``: each parameter's partials summed over its contiguous chunk range, in fixed order. The
   caller all-reduces these per-parameter sums under ZeRO.
4. ``_lamb_apply``: the trust ratio from the sums, ``u`` recomputed from ``(m, v, w)`` (no scratch copy of the
   update: the same bytes moved as storing it, and no memory), ``w -= lr * trust * u`` stored in ``w``'s dtype.

The step's decisions stay on the device: the clip factor and the skip (a non-finite gradient norm) enter the
hyperparameter table, which ``hyperparameter_table`` builds there from device step counts, so a step reads nothing
back to the host. A skipped step still runs the kernels, with rates that leave weights and moments unchanged.

Where it stops being good: it is memory-bound (fp32: 4 bytes read in kernel 1, 16 read and 8 written in kernel 2,
12 read and 4 written in kernel 4, per element), and a skipped step costs as much as a taken one. Parameters much
smaller than ``CHUNK`` each take a mostly idle program; BERT has a few hundred such biases, a negligible share.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DTYPES, TYPE_NAMES, aot_spec, dedupe
from ._common import empty as _empty
from .downcast import to_output

CHUNK = 16384  # elements per program
BLOCK = 1024  # elements per loop iteration: 8 per thread at 4 warps
NUM_WARPS = 4
SUM_BLOCK = 1024  # partials per loop iteration in the segment sums

# The tables the kernels read, row-major, and their columns (constexprs, so that the kernels index by name).
# Addresses (int64): data pointers of weight, grad, exp_avg, exp_avg_sq, then 1 if all four are 16-byte aligned.
ADDRESS_COLUMNS = tl.constexpr(5)
WEIGHT, GRAD, EXP_AVG, EXP_AVG_SQ, ALIGNED = (tl.constexpr(i) for i in range(5))
# Chunks (int64): the tensor's row in its launch, start, numel, parameter index (-1: covered by no fragment).
CHUNK_COLUMNS = tl.constexpr(4)
ROW, START, NUMEL, PARAM = (tl.constexpr(i) for i in range(4))
# Hyper (fp32), one row per tensor: lr, 1 - beta1, beta2, 1 - beta2, 1 - beta1^step, 1 - beta2^step, eps, weight
# decay, max trust ratio (inf: none), gradient clip factor (0: a skipped step, whose gradients are read as zeros).
HYPER_COLUMNS = tl.constexpr(10)
LR, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, BIAS_CORRECTION1, BIAS_CORRECTION2, EPS, WEIGHT_DECAY, MAX_TRUST, CLIP = (
    tl.constexpr(i) for i in range(10)
)
# Partials and Sums (fp32): per chunk (moments) or per parameter (sums), the squared norms of w and of u.
NORM_COLUMNS = tl.constexpr(2)
W_SQ, U_SQ = (tl.constexpr(i) for i in range(2))
# Ranges (int64), one row per segment: its first partial row and the end of its partial rows.
RANGE_COLUMNS = tl.constexpr(2)
FIRST, END = (tl.constexpr(i) for i in range(2))
SUM_COLUMNS = (1, NORM_COLUMNS.value)  # widths of the partial rows the segment sums add up

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Kernels ------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk(Chunks, Addresses, pid, CHUNK: tl.constexpr):
    """Row, start and length of chunk ``pid``, and whether it takes the unmasked vector path."""
    row = tl.load(Chunks + pid * CHUNK_COLUMNS + ROW)
    start = tl.load(Chunks + pid * CHUNK_COLUMNS + START)
    numel = tl.load(Chunks + pid * CHUNK_COLUMNS + NUMEL)
    fast = (numel == CHUNK) & (tl.load(Addresses + row * ADDRESS_COLUMNS + ALIGNED) != 0)
    return row, start, numel, fast


@triton.jit
def _tensor(Addresses, row, column: tl.constexpr, start, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """Typed pointer to element ``start`` of the tensor in address-table column ``column``. On the fast path the
    host guarantees 16-byte alignment (aligned tensor, start a multiple of CHUNK), which allows vector access."""
    pointer = tl.load(Addresses + row * ADDRESS_COLUMNS + column).to(tl.pointer_type(DTYPE)) + start
    if FAST:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(pointer, offs, numel, FAST: tl.constexpr):
    """Elements ``offs`` as fp32 (upcast right after the load; the interpreter computes bf16 on raw bits); masked
    to ``numel`` off the fast path, with zeros beyond it."""
    x = tl.load(pointer + offs) if FAST else tl.load(pointer + offs, mask=offs < numel, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store(pointer, offs, x, numel, FAST: tl.constexpr):
    if FAST:
        tl.store(pointer + offs, x)
    else:
        tl.store(pointer + offs, x, mask=offs < numel)


@triton.jit
def _raw_update(m, v, w, bias_correction1, bias_correction2, eps, weight_decay):
    """``m_hat / (sqrt(v_hat) + eps) + wd * w`` in the torch path's order of operations, IEEE-rounded."""
    denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
    return tl.div_rn(tl.div_rn(m, bias_correction1), denom) + weight_decay * w


@triton.jit
def _grad_squares_chunk(
    Addresses, row, start, numel, GRAD_DTYPE: tl.constexpr, FAST: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    G = _tensor(Addresses, row, GRAD, start, GRAD_DTYPE, FAST)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    end = CHUNK if FAST else numel
    for b in range(0, end, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        g = _load(G, offs, numel, FAST)
        acc += g * g
    return tl.sum(acc, axis=0)


@triton.jit
def _lamb_grad_squares(
    Addresses, Chunks, Partials, first_chunk, GRAD_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    row, start, numel, fast = _chunk(Chunks, Addresses, pid, CHUNK)
    if fast:
        total = _grad_squares_chunk(Addresses, row, start, numel, GRAD_DTYPE, True, CHUNK, BLOCK)
    else:
        total = _grad_squares_chunk(Addresses, row, start, numel, GRAD_DTYPE, False, CHUNK, BLOCK)
    tl.store(Partials + first_chunk + pid, total)


@triton.jit
def _moments_chunk(
    Addresses,
    Hyper,
    row,
    start,
    numel,
    clip,
    WEIGHT_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    FAST: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    W = _tensor(Addresses, row, WEIGHT, start, WEIGHT_DTYPE, FAST)
    G = _tensor(Addresses, row, GRAD, start, GRAD_DTYPE, FAST)
    M = _tensor(Addresses, row, EXP_AVG, start, tl.float32, FAST)
    V = _tensor(Addresses, row, EXP_AVG_SQ, start, tl.float32, FAST)
    hyper = Hyper + row * HYPER_COLUMNS
    one_minus_beta1 = tl.load(hyper + ONE_MINUS_BETA1)
    beta2 = tl.load(hyper + BETA2)
    one_minus_beta2 = tl.load(hyper + ONE_MINUS_BETA2)
    bias_correction1 = tl.load(hyper + BIAS_CORRECTION1)
    bias_correction2 = tl.load(hyper + BIAS_CORRECTION2)
    eps = tl.load(hyper + EPS)
    weight_decay = tl.load(hyper + WEIGHT_DECAY)
    w_sq = tl.zeros([BLOCK], dtype=tl.float32)
    u_sq = tl.zeros([BLOCK], dtype=tl.float32)
    end = CHUNK if FAST else numel
    for b in range(0, end, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        g = _load(G, offs, numel, FAST) * clip
        m = _load(M, offs, numel, FAST)
        v = _load(V, offs, numel, FAST)
        w = _load(W, offs, numel, FAST)
        m = m + one_minus_beta1 * (g - m)  # torch.lerp's formula for weights below 0.5
        v = v * beta2 + one_minus_beta2 * g * g
        _store(M, offs, m, numel, FAST)
        _store(V, offs, v, numel, FAST)
        # Masked-off lanes hold zeros everywhere, so their update is 0 / (0 + eps) + wd * 0 = 0.
        u = _raw_update(m, v, w, bias_correction1, bias_correction2, eps, weight_decay)
        w_sq += w * w
        u_sq += u * u
    return tl.sum(w_sq, axis=0), tl.sum(u_sq, axis=0)


@triton.jit
def _lamb_moments(
    Addresses,
    Hyper,
    Chunks,
    Partials,
    first_chunk,
    WEIGHT_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row, start, numel, fast = _chunk(Chunks, Addresses, pid, CHUNK)
    clip = tl.load(Hyper + row * HYPER_COLUMNS + CLIP)
    # A skipped step (clip 0): the chunk is walked as empty, so m and v are neither read nor written (its gradients
    # hold an inf or a nan somewhere) and its partial sums are 0, a trust ratio of 1 for the apply kernel, which
    # then adds lr 0 times a finite update.
    skip = clip == 0.0
    fast = fast & (clip != 0.0)
    numel = tl.where(skip, 0, numel)
    if fast:
        w_sq, u_sq = _moments_chunk(
            Addresses, Hyper, row, start, numel, clip, WEIGHT_DTYPE, GRAD_DTYPE, True, CHUNK, BLOCK
        )
    else:
        w_sq, u_sq = _moments_chunk(
            Addresses, Hyper, row, start, numel, clip, WEIGHT_DTYPE, GRAD_DTYPE, False, CHUNK, BLOCK
        )
    tl.store(Partials + (first_chunk + pid) * NORM_COLUMNS + W_SQ, w_sq)
    tl.store(Partials + (first_chunk + pid) * NORM_COLUMNS + U_SQ, u_sq)


@triton.jit
def _lamb_segment_sums(Partials, Ranges, Out, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (s, c): column ``c`` of the ``COLUMNS``-wide partial rows ``Ranges[s]`` (first, end), summed in a
    fixed order."""
    segment = tl.program_id(0)
    column = tl.program_id(1)
    first = tl.load(Ranges + segment * RANGE_COLUMNS + FIRST)
    end = tl.load(Ranges + segment * RANGE_COLUMNS + END)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(first, end, BLOCK):
        index = i + tl.arange(0, BLOCK)
        acc += tl.load(Partials + index * COLUMNS + column, mask=index < end, other=0.0)
    tl.store(Out + segment * COLUMNS + column, tl.sum(acc, axis=0))


@triton.jit
def _apply_chunk(
    Addresses,
    row,
    start,
    numel,
    scale,
    bias_correction1,
    bias_correction2,
    eps,
    weight_decay,
    WEIGHT_DTYPE: tl.constexpr,
    FAST: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    W = _tensor(Addresses, row, WEIGHT, start, WEIGHT_DTYPE, FAST)
    M = _tensor(Addresses, row, EXP_AVG, start, tl.float32, FAST)
    V = _tensor(Addresses, row, EXP_AVG_SQ, start, tl.float32, FAST)
    end = CHUNK if FAST else numel
    for b in range(0, end, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        m = _load(M, offs, numel, FAST)
        v = _load(V, offs, numel, FAST)
        w = _load(W, offs, numel, FAST)
        u = _raw_update(m, v, w, bias_correction1, bias_correction2, eps, weight_decay)
        _store(W, offs, to_output(w + scale * u, WEIGHT_DTYPE), numel, FAST)


@triton.jit
def _lamb_apply(Addresses, Hyper, Chunks, Sums, WEIGHT_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row, start, numel, fast = _chunk(Chunks, Addresses, pid, CHUNK)
    param = tl.load(Chunks + pid * CHUNK_COLUMNS + PARAM)
    covered = param >= 0
    w_norm = tl.sqrt_rn(tl.load(Sums + param * NORM_COLUMNS + W_SQ, mask=covered, other=0.0))
    u_norm = tl.sqrt_rn(tl.load(Sums + param * NORM_COLUMNS + U_SQ, mask=covered, other=0.0))
    trust = tl.where((w_norm > 0.0) & (u_norm > 0.0), tl.div_rn(w_norm, tl.maximum(u_norm, 1e-30)), 1.0)
    hyper = Hyper + row * HYPER_COLUMNS
    trust = tl.minimum(trust, tl.load(hyper + MAX_TRUST))
    trust = tl.where(covered, trust, 1.0)  # elements of no parameter (ZeRO padding) take the plain update
    scale = -tl.load(hyper + LR) * trust
    bias_correction1 = tl.load(hyper + BIAS_CORRECTION1)
    bias_correction2 = tl.load(hyper + BIAS_CORRECTION2)
    eps = tl.load(hyper + EPS)
    weight_decay = tl.load(hyper + WEIGHT_DECAY)
    if fast:
        _apply_chunk(
            Addresses,
            row,
            start,
            numel,
            scale,
            bias_correction1,
            bias_correction2,
            eps,
            weight_decay,
            WEIGHT_DTYPE,
            True,
            CHUNK,
            BLOCK,
        )
    else:
        _apply_chunk(
            Addresses,
            row,
            start,
            numel,
            scale,
            bias_correction1,
            bias_correction2,
            eps,
            weight_decay,
            WEIGHT_DTYPE,
            False,
            CHUNK,
            BLOCK,
        )


# The chunk plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorLayout:
    """One flat tensor the optimizer updates: its size, dtypes, and the parameters' fragments it holds."""

    numel: int
    weight_dtype: torch.dtype
    grad_dtype: torch.dtype
    fragments: tuple[tuple[int, int, int], ...]  # (parameter index, start, numel)


@dataclass(frozen=True)
class Launch:
    weight_dtype: torch.dtype
    grad_dtype: torch.dtype
    tensors: tuple[int, ...]  # positions in the step's tensor list, in address-table order
    chunks: torch.Tensor  # [n, CHUNK_COLUMNS] int64 on the device
    first_chunk: int  # row of this launch's first chunk in the partials
    rows: torch.Tensor  # ``tensors`` as int64 on the device: picks the launch's hyperparameter rows without a copy


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    num_chunks: int
    num_params: int
    param_ranges: torch.Tensor  # [num_params, 2] int64 on the device: each parameter's partial rows (first, end)
    all_chunks: torch.Tensor  # [[0, num_chunks]]: every partial row, for the gradient norm


def _pieces(index: int, layout: TensorLayout) -> list[tuple[int, int, int]]:
    """``(param, start, numel)`` covering the tensor: its fragments plus the gaps between them (param -1)."""
    pieces, at = [], 0
    for param, start, numel in sorted(layout.fragments, key=lambda f: f[1]):
        if param < 0 or start < at or numel < 0 or start + numel > layout.numel:
            raise ValueError(
                f"lamb: tensor {index} of {layout.numel} elements: fragment (param {param}, start "
                f"{start}, numel {numel}) overlaps another or lies outside the tensor"
            )
        if start > at:
            pieces.append((-1, at, start - at))
        if numel:
            pieces.append((param, start, numel))
        at = start + numel
    if at < layout.numel:
        pieces.append((-1, at, layout.numel - at))
    return pieces


def plan_chunks(layouts: Sequence[TensorLayout], num_params: int, device: torch.device) -> Plan:
    """The chunk tables for a list of tensors. Depends only on the layout, so callers cache it across steps."""
    by_dtypes: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for index, layout in enumerate(layouts):
        for dtype in (layout.weight_dtype, layout.grad_dtype):
            if dtype not in _TL_DTYPES:
                raise ValueError(f"lamb: tensor {index} has dtype {dtype}; the kernel takes {list(_TL_DTYPES)}")
        by_dtypes.setdefault((layout.weight_dtype, layout.grad_dtype), []).append(index)
    launches, ranges, first_chunk = [], [[0, 0] for _ in range(num_params)], 0
    seen: set[int] = set()
    for (weight_dtype, grad_dtype), tensors in by_dtypes.items():
        # A parameter's chunks are adjacent (pieces ordered by parameter), so its sums are one contiguous range.
        pieces = sorted(
            (param if param >= 0 else num_params, row, start, numel)
            for row, index in enumerate(tensors)
            for param, start, numel in _pieces(index, layouts[index])
        )
        rows, current = [], None
        for param, row, start, numel in pieces:
            if param < num_params and param != current:
                if param in seen:
                    raise ValueError(f"lamb: parameter {param} has fragments in tensors of different dtypes")
                seen.add(param)
                ranges[param][0] = first_chunk + len(rows)
            current = param
            at, end = start, start + numel
            while at < end:
                stop = min(end, (at // CHUNK + 1) * CHUNK)  # boundaries on multiples of CHUNK: aligned full chunks
                rows.append((row, at, stop - at, param if param < num_params else -1))
                at = stop
            if param < num_params:
                ranges[param][1] = first_chunk + len(rows)
        if rows:
            chunks = torch.tensor(rows, dtype=torch.int64).to(device)
            index = torch.tensor(tensors, dtype=torch.int64).to(device)
            launches.append(Launch(weight_dtype, grad_dtype, tuple(tensors), chunks, first_chunk, index))
        first_chunk += len(rows)
    return Plan(
        tuple(launches),
        first_chunk,
        num_params,
        torch.tensor(ranges, dtype=torch.int64).view(num_params, 2).to(device),
        torch.tensor([[0, first_chunk]], dtype=torch.int64).to(device),
    )


# Host launchers -------------------------------------------------------------------------------------------------
def launch_meta(
    kernel: str,
    weight_dtype: torch.dtype | None = None,
    grad_dtype: torch.dtype | None = None,
    columns: int | None = None,
) -> dict[str, object]:
    """Every constexpr and launch option of ``kernel`` ("grad_squares", "moments", "segment_sums", "apply") for
    tensors of these dtypes (only those the kernel reads) and, for the segment sums, partial rows ``columns`` wide
    (1 for the gradient norm, ``NORM_COLUMNS`` for the trust ratios), as the launchers pass it and ``aot_specs``
    compiles it."""
    tiles = {"CHUNK": CHUNK, "BLOCK": BLOCK, "num_warps": NUM_WARPS}
    if kernel == "grad_squares":
        return {"GRAD_DTYPE": _TL_DTYPES[grad_dtype], **tiles}
    if kernel == "moments":
        return {"WEIGHT_DTYPE": _TL_DTYPES[weight_dtype], "GRAD_DTYPE": _TL_DTYPES[grad_dtype], **tiles}
    if kernel == "apply":
        return {"WEIGHT_DTYPE": _TL_DTYPES[weight_dtype], **tiles}
    if kernel == "segment_sums":
        if columns not in SUM_COLUMNS:
            raise ValueError(f"lamb: segment sums over {columns} columns, not one of {SUM_COLUMNS}")
        return {"COLUMNS": columns, "BLOCK": SUM_BLOCK, "num_warps": NUM_WARPS}
    raise ValueError(f"lamb: unknown kernel {kernel!r}")


def _addresses(launch: Launch, *columns: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """The launch's address table from the step's tensor lists (weights, grads, exp_avgs, exp_avg_sqs; None for a
    list the kernel does not read). Rebuilt every step: gradients may be reallocated between steps."""
    rows = []
    for index in launch.tensors:
        pointers = [0 if column is None else column[index].data_ptr() for column in columns]
        rows.append(pointers + [int(all(p % 16 == 0 for p in pointers))])
    return torch.tensor(rows, dtype=torch.int64).to(launch.chunks.device)


def _segment_sums(partials: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    columns = partials.shape[1]
    out = _empty((ranges.shape[0], columns), torch.float32, partials.device)
    if ranges.shape[0]:
        meta = launch_meta("segment_sums", columns=columns)
        _lamb_segment_sums[(ranges.shape[0], columns)](partials, ranges, out, **meta)
    return out


def _check(plan: Plan, name: str, tensors: Sequence[torch.Tensor]) -> None:
    for launch in plan.launches:
        for index in launch.tensors:
            t = tensors[index]
            if not t.is_contiguous() or t.device != launch.chunks.device:
                raise ValueError(
                    f"lamb: {name}[{index}] must be contiguous on {launch.chunks.device}, got strides "
                    f"{t.stride()} on {t.device}"
                )


def grad_square_sum(plan: Plan, grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of every squared gradient element (fp32, 0-dim, on the device): inf or nan when a gradient is not
    finite."""
    _check(plan, "grads", grads)
    device = plan.all_chunks.device
    partials = _empty((plan.num_chunks, 1), torch.float32, device)
    for launch in plan.launches:
        addresses = _addresses(launch, None, grads, None, None)
        _lamb_grad_squares[(launch.chunks.shape[0],)](
            addresses,
            launch.chunks,
            partials,
            launch.first_chunk,
            **launch_meta("grad_squares", grad_dtype=launch.grad_dtype),
        )
    if not plan.num_chunks:
        return torch.zeros((), dtype=torch.float32, device=device)
    return _segment_sums(partials, plan.all_chunks).view(())


def hyperparameters(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
    max_trust_ratio: float | None,
    clip: float = 1.0,
) -> list[float]:
    """One tensor's row of the hyperparameter table, from host numbers (rounded to fp32 as torch rounds Python
    scalars). The optimizer builds its table on the device instead (``hyperparameter_table``)."""
    beta1, beta2 = betas
    return [
        lr,
        1 - beta1,
        beta2,
        1 - beta2,
        1 - beta1**step,
        1 - beta2**step,
        eps,
        weight_decay,
        math.inf if max_trust_ratio is None else max_trust_ratio,
        clip,
    ]


def constants_table(constants: Sequence[tuple[float, float, float, float, float, float | None]]) -> torch.Tensor:
    """``[n, 6]`` float64 on the host: each tensor's ``(lr, beta1, beta2, eps, weight_decay, max_trust_ratio)``,
    infinity for None (no trust-ratio cap)."""
    return torch.tensor(
        [[lr, b1, b2, eps, wd, math.inf if cap is None else cap] for lr, b1, b2, eps, wd, cap in constants],
        dtype=torch.float64,
    )


def hyperparameter_table(
    constants: Sequence[tuple[float, float, float, float, float, float | None]] | torch.Tensor,
    steps: torch.Tensor,
    clip: torch.Tensor,
) -> torch.Tensor:
    """The ``[n, HYPER_COLUMNS]`` fp32 table on the device, built there: nothing is read back to the host.

    ``constants``: each tensor's ``(lr, beta1, beta2, eps, weight_decay, max_trust_ratio or None)``, host numbers,
    or their ``constants_table`` already on the device (the caller chooses how it gets there); ``steps``: ``[n]``
    float64 on the device, each tensor's step count including this step; ``clip``: the 0-dim clip factor on the
    device, 0 for a step to skip. A skipped step's rows have learning rate 0, ``1 - beta1 = 1 - beta2 = 0`` and
    ``beta2 = 1``, so the kernels leave weights and moments bit for bit as they were; its bias corrections use a step
    count of at least 1, so they stay finite. Each entry is computed in float64 and rounded once to fp32, as
    ``hyperparameters`` rounds Python numbers."""
    device = steps.device
    c = (constants if isinstance(constants, torch.Tensor) else constants_table(constants)).to(device)
    lr, beta1, beta2, eps, weight_decay, cap = c.unbind(1)
    keep = (clip != 0).to(torch.float64)
    step = steps.to(torch.float64).clamp(min=1.0)
    columns = [
        lr * keep,
        (1 - beta1) * keep,
        torch.where(keep > 0, beta2, torch.ones_like(beta2)),
        (1 - beta2) * keep,
        1 - beta1.pow(step),
        1 - beta2.pow(step),
        eps,
        weight_decay,
        cap,
        clip.to(torch.float64).expand_as(lr),
    ]
    return torch.stack(columns, dim=1).to(torch.float32)


def _hyper(launch: Launch, hyper: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    """The launch's rows of ``hyper``: host rows (``hyperparameters``) or a device table (``hyperparameter_table``)."""
    if isinstance(hyper, torch.Tensor):
        return hyper.index_select(0, launch.rows)
    return torch.tensor([hyper[index] for index in launch.tensors], dtype=torch.float32).to(launch.chunks.device)


def moments_and_norms(
    plan: Plan,
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hyper: Sequence[Sequence[float]] | torch.Tensor,
) -> torch.Tensor:
    """Updates the moments in place (not for a row whose clip factor is 0: a skipped step); returns
    ``[num_params, 2]`` fp32: each parameter's summed ``||w||^2`` and ``||u||^2`` over the fragments these tensors hold
    (zeros for a parameter they hold none of)."""
    for name, tensors in (("weights", weights), ("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        _check(plan, name, tensors)
    partials = _empty((plan.num_chunks, NORM_COLUMNS.value), torch.float32, plan.all_chunks.device)
    for launch in plan.launches:
        _lamb_moments[(launch.chunks.shape[0],)](
            _addresses(launch, weights, grads, exp_avgs, exp_avg_sqs),
            _hyper(launch, hyper),
            launch.chunks,
            partials,
            launch.first_chunk,
            **launch_meta("moments", launch.weight_dtype, launch.grad_dtype),
        )
    return _segment_sums(partials, plan.param_ranges)


def apply_update(
    plan: Plan,
    weights: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hyper: Sequence[Sequence[float]] | torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """``w -= lr * trust * u`` with each parameter's trust ratio from ``sums`` (all-reduced under ZeRO)."""
    if sums.shape != (plan.num_params, NORM_COLUMNS.value) or sums.dtype != torch.float32 or not sums.is_contiguous():
        raise ValueError(
            f"lamb: sums must be contiguous fp32 of shape ({plan.num_params}, 2), got {sums.dtype} {tuple(sums.shape)}"
        )
    for launch in plan.launches:
        _lamb_apply[(launch.chunks.shape[0],)](
            _addresses(launch, weights, None, exp_avgs, exp_avg_sqs),
            _hyper(launch, hyper),
            launch.chunks,
            sums,
            **launch_meta("apply", weight_dtype=launch.weight_dtype),
        )


# Reference ------------------------------------------------------------------------------------------------------
def reference(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hyper: Sequence[Sequence[float]],
    layouts: Sequence[TensorLayout],
    num_params: int,
) -> torch.Tensor:
    """The two phases in plain torch on the same inputs, with no all-reduce: updates moments and weights in place
    and returns the per-parameter sums it used. The definition the kernels are tested against, element for
    element (``fastbert.optim.Lamb``'s torch path is the definition of the whole step)."""
    sums = torch.zeros(num_params, 2, dtype=torch.float32, device=weights[0].device)
    updates = []
    for w, g, m, v, h, layout in zip(weights, grads, exp_avgs, exp_avg_sqs, hyper, layouts, strict=True):
        _, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, wd, _, clip = h
        g = g.float() * clip if clip else torch.zeros_like(g, dtype=torch.float32)
        m.lerp_(g, one_minus_beta1)
        v.mul_(beta2).addcmul_(g, g, value=one_minus_beta2)
        u = (m / bc1) / ((v / bc2).sqrt() + eps) + wd * w.float()
        updates.append(u)
        for param, start, numel in layout.fragments:
            sums[param, 0] += w.float().view(-1)[start : start + numel].square().sum()
            sums[param, 1] += u.view(-1)[start : start + numel].square().sum()
    norms = sums.sqrt()
    trust = torch.where((norms[:, 0] > 0) & (norms[:, 1] > 0), norms[:, 0] / norms[:, 1].clamp(min=1e-30), 1.0)
    for w, u, h, layout in zip(weights, updates, hyper, layouts, strict=True):
        scale = torch.ones_like(u).view(-1)
        for param, start, numel in layout.fragments:
            scale[start : start + numel] = trust[param].clamp(max=h[8])
        w.copy_((w.float() - h[0] * scale.view_as(u) * u).to(w.dtype))
    return sums


_FUNCTIONS = {
    "grad_squares": _lamb_grad_squares,
    "moments": _lamb_moments,
    "segment_sums": _lamb_segment_sums,
    "apply": _lamb_apply,
}
_TYPES = {
    "Addresses": "*i64",
    "Chunks": "*i64",
    "Ranges": "*i64",
    "Hyper": "*fp32",
    "Partials": "*fp32",
    "Sums": "*fp32",
    "Out": "*fp32",
    "first_chunk": "i32",
}


def aot_specs() -> list[dict]:
    """Every launch ``launch_meta`` can produce: each kernel with every (weight, grad) dtype pair the plan accepts
    (a kernel that reads one of them gives the same launch for every value of the other) and each width of the
    segment sums, one tile configuration for all."""
    specs = []
    for kernel, fn in _FUNCTIONS.items():
        for weight, grad, columns in itertools.product(DTYPES, DTYPES, SUM_COLUMNS):
            meta = launch_meta(kernel, weight, grad, columns if kernel == "segment_sums" else None)
            config = {"kernel": kernel}
            if "WEIGHT_DTYPE" in meta:
                config["weight"] = TYPE_NAMES[weight]
            if "GRAD_DTYPE" in meta:
                config["grad"] = TYPE_NAMES[grad]
            config.update({k: v for k, v in meta.items() if k in ("COLUMNS", "CHUNK", "BLOCK")})
            types = {name: _TYPES[name] for name in fn.arg_names if name not in meta}
            specs.append(aot_spec(fn, config, meta, types))
    return dedupe(specs)
