"""``LayerNorm(dropout(x + x_bias) + residual)`` forward and backward in Triton, returning ``(normalized, summed)``.

Owns the row kernels, their launchers and the autograd.Function. One program normalizes ``BLOCK_M`` whole rows, so
a row must fit in one tile: rows up to ``MAX_COLUMNS`` elements (BERT-large is 1024, ALBERT-xxlarge 4096). The
forward saves the pre-norm sum (returned anyway, since pre-LN layers carry it as their residual stream), the mean
and the reciprocal standard deviation, never the normalized tensor. Dropout draws its mask from a seed with
philox, keyed by the element's flat index, so the backward regenerates it instead of storing it. The backward
writes ``dx`` (and ``dresidual`` when dropout makes them differ) and fp32 partial sums of ``dweight``, ``dbias``
and ``dx_bias`` per program, which torch adds up: no atomics, deterministic.

Where it stops being good: the kernel is memory-bound and moves the minimum for an unfused producer (read ``x``,
``residual``; write ``normalized``, ``summed``); folding it into the epilogue of the matmul that produces ``x``
would save one round trip, which this kernel cannot do. Rows narrower than 128 waste most of a tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import DTYPES, PARTIAL_ROWS, TYPE_NAMES, aot_spec, as_rows, dedupe, draw_seed
from ._common import empty as _empty
from .downcast import to_output

MAX_COLUMNS = 4096


@triton.jit
def _residual_layer_norm_forward(
    X,
    XBias,
    Residual,
    Weight,
    Bias,
    Y,
    Sum,
    Mean,
    Rstd,
    rows,
    cols,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    eps,
    dropout_p,
    seed,
    HAS_X_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    col_ok = col < cols
    mask = row_ok[:, None] & col_ok[None, :]
    row64 = row.to(tl.int64)
    s = tl.load(X + row64[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        s += tl.load(XBias + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        keep = tl.rand(seed, row64[:, None] * cols + col[None, :]) >= dropout_p
        s = tl.where(keep, s / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        s += tl.load(Residual + row64[:, None] * stride_r + col[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.where(mask, s, 0.0)
    if STORE_SUM:
        # Normalize what was stored, so that the backward (which reads the stored sum) sees the same numbers.
        s = to_output(s, Sum.dtype.element_ty)
        tl.store(Sum + row64[:, None] * stride_s + col[None, :], s, mask=mask)
        s = s.to(tl.float32)
    mean = tl.sum(s, axis=1) / cols
    centered = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / cols + eps)
    w = tl.load(Weight + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(Bias + col, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + row64[:, None] * stride_y + col[None, :], to_output(y, Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean, mask=row_ok)
    tl.store(Rstd + row, rstd, mask=row_ok)


@triton.jit
def _residual_layer_norm_backward(
    DY,
    DSum,
    Sum,
    Weight,
    Mean,
    Rstd,
    DS,
    DX,
    DWeightPartial,
    DBiasPartial,
    DXBiasPartial,
    rows,
    cols,
    stride_dy,
    stride_dsum,
    stride_s,
    stride_ds,
    stride_dx,
    dropout_p,
    seed,
    HAS_DSUM: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_X_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program p walks row tiles p, p + P, p + 2P, ... and writes one partial row of each parameter gradient.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < cols
    w = tl.load(Weight + col, mask=col_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dxbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(rows, BLOCK_M), programs):
        row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        row64 = row.to(tl.int64)
        s = tl.load(Sum + row64[:, None] * stride_s + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / cols
        c2 = tl.sum(wdy, axis=1) / cols
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            ds += tl.load(DSum + row64[:, None] * stride_dsum + col[None, :], mask=mask, other=0.0).to(tl.float32)
        ds = tl.where(mask, ds, 0.0)
        tl.store(DS + row64[:, None] * stride_ds + col[None, :], to_output(ds, DS.dtype.element_ty), mask=mask)
        dx = ds
        if DROPOUT:
            keep = tl.rand(seed, row64[:, None] * cols + col[None, :]) >= dropout_p
            dx = tl.where(keep, ds / (1.0 - dropout_p), 0.0)
            tl.store(DX + row64[:, None] * stride_dx + col[None, :], to_output(dx, DX.dtype.element_ty), mask=mask)
        dweight += tl.sum(dy * xhat, axis=0)
        dbias += tl.sum(dy, axis=0)
        if HAS_X_BIAS:
            dxbias += tl.sum(dx, axis=0)
    tl.store(DWeightPartial + pid * cols + col, dweight, mask=col_ok)
    tl.store(DBiasPartial + pid * cols + col, dbias, mask=col_ok)
    if HAS_X_BIAS:
        tl.store(DXBiasPartial + pid * cols + col, dxbias, mask=col_ok)


def config(cols: int, backward: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Tile and warps for rows of ``cols`` elements of ``dtype``: whole rows, about 4096 (forward) or 2048
    (backward, and float32 forward) elements per program, and enough warps that each thread holds at most 16 or 8
    elements of each tile, which is what keeps the philox dropout state out of local memory (kernels/aot.py
    checks: no spills)."""
    if cols > MAX_COLUMNS:
        raise ValueError(f"residual_layer_norm: rows of {cols} elements exceed MAX_COLUMNS={MAX_COLUMNS}")
    if dtype not in DTYPES:
        raise ValueError(f"residual_layer_norm: dtype {dtype} is not one of {DTYPES}")
    block_n = max(128, triton.next_power_of_2(cols))
    # Float32 rows in the forward take the backward's 8 elements per thread: at 16 their philox state spills
    # (8 bytes at BLOCK_N=256 on sm_80 with unaligned rows).
    small = backward or dtype == torch.float32
    elements = 2048 if small else 4096
    block_m = max(1, elements // block_n)
    per_warp = 256 if small else 512
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": max(4, min(16, block_m * block_n // per_warp))}


def launch_meta(
    cols: int,
    dtype: torch.dtype,
    backward: bool,
    has_x_bias: bool,
    has_residual_or_dsum: bool,
    dropout: bool,
) -> dict[str, object]:
    """Every constexpr and launch option of the forward (``has_residual_or_dsum``: a residual is added) or the
    backward (``has_residual_or_dsum``: the summed output has a gradient of its own) at rows of ``cols``, as the
    launchers pass it and ``aot_specs`` compiles it."""
    if backward:
        flags = {"HAS_DSUM": has_residual_or_dsum, "DROPOUT": dropout, "HAS_X_BIAS": has_x_bias}
    else:
        flags = {"HAS_X_BIAS": has_x_bias, "HAS_RESIDUAL": has_residual_or_dsum, "DROPOUT": dropout}
        flags["STORE_SUM"] = has_x_bias or has_residual_or_dsum or dropout
    return {**flags, **config(cols, backward, dtype)}


def forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None,
    dropout_p: float,
    seed: int,
):
    cols = x.shape[-1]
    for name, t in (("residual", residual), ("x_bias", None if x_bias is None else x_bias.expand(x.shape))):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"residual_layer_norm: {name} shape {tuple(t.shape)} != x shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (cols,):
            raise ValueError(f"residual_layer_norm: {name} shape {tuple(t.shape)} != ({cols},)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"residual_layer_norm: dropout_p={dropout_p} is not in [0, 1)")
    x2 = as_rows(x)
    r2 = x2 if residual is None else as_rows(residual)
    rows = x2.shape[0]
    meta = launch_meta(cols, x.dtype, False, x_bias is not None, residual is not None, dropout_p > 0.0)
    store_sum = meta["STORE_SUM"]
    y = _empty((rows, cols), x.dtype, x.device)
    summed = _empty((rows, cols), x.dtype, x.device) if store_sum else x2
    mean = _empty((rows,), torch.float32, x.device)
    rstd = _empty((rows,), torch.float32, x.device)
    if rows:
        _residual_layer_norm_forward[(triton.cdiv(rows, meta["BLOCK_M"]),)](
            x2,
            x2 if x_bias is None else x_bias.contiguous(),
            r2,
            weight.contiguous(),
            bias.contiguous(),
            y,
            summed,
            mean,
            rstd,
            rows,
            cols,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            summed.stride(0),
            eps,
            dropout_p,
            seed,
            **meta,
        )
    return y.view(x.shape), summed.view(x.shape), mean, rstd


def backward(
    dy: torch.Tensor,
    dsum: torch.Tensor | None,
    summed: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: int,
    has_x_bias: bool,
):
    """Returns ``(dx, dresidual, dweight, dbias, dx_bias)``; ``dx_bias`` is None without an ``x_bias``."""
    s2, dy2 = as_rows(summed), as_rows(dy)
    dsum2 = None if dsum is None else as_rows(dsum)
    rows, cols = s2.shape
    meta = launch_meta(cols, summed.dtype, True, has_x_bias, dsum2 is not None, dropout_p > 0.0)
    programs = max(1, min(triton.cdiv(rows, meta["BLOCK_M"]), PARTIAL_ROWS))
    ds = _empty((rows, cols), summed.dtype, summed.device)
    dx = _empty((rows, cols), summed.dtype, summed.device) if dropout_p > 0.0 else ds
    partials = [_empty((programs, cols), torch.float32, summed.device) for _ in range(2 + has_x_bias)]
    dxb_partial = partials[2] if has_x_bias else partials[0]
    if rows:
        _residual_layer_norm_backward[(programs,)](
            dy2,
            dy2 if dsum2 is None else dsum2,
            s2,
            weight.contiguous(),
            mean,
            rstd,
            ds,
            dx,
            partials[0],
            partials[1],
            dxb_partial,
            rows,
            cols,
            dy2.stride(0),
            dy2.stride(0) if dsum2 is None else dsum2.stride(0),
            s2.stride(0),
            ds.stride(0),
            dx.stride(0),
            dropout_p,
            seed,
            **meta,
        )
        sums = [p.sum(dim=0).to(weight.dtype) for p in partials]
    else:
        sums = [torch.zeros_like(weight) for _ in partials]
    dx_bias = sums[2] if has_x_bias else None
    return dx.view(summed.shape), ds.view(summed.shape), sums[0], sums[1], dx_bias


def reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition the kernel is tested against, with dropout given as an explicit 0/1 ``keep`` mask."""
    if x_bias is not None:
        x = x + x_bias
    if keep is not None:
        x = x * keep / (1.0 - dropout_p)
    summed = x if residual is None else x + residual
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps), summed


class ResidualLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, x_bias, dropout_p, seed):
        y, summed, mean, rstd = forward(x, residual, weight, bias, eps, x_bias, dropout_p, seed)
        ctx.save_for_backward(summed, weight, mean, rstd)
        ctx.dropout_p, ctx.seed, ctx.has_x_bias = dropout_p, seed, x_bias is not None
        ctx.has_residual = residual is not None
        if summed.data_ptr() == x.data_ptr():
            # Without residual, bias or dropout ``summed`` is ``x``'s memory; autograd wants an output of its own,
            # and a view costs nothing.
            summed = x.view_as(x)
        return y, summed

    @staticmethod
    def backward(ctx, dy, dsum):
        summed, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(summed)
        dx, dres, dweight, dbias, dx_bias = backward(
            dy, dsum, summed, weight, mean, rstd, ctx.dropout_p, ctx.seed, ctx.has_x_bias
        )
        return dx, dres if ctx.has_residual else None, dweight, dbias, None, dx_bias, None, None


def residual_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(dropout(x + x_bias) + residual)`` over the last dimension; returns ``(normalized, summed)``.

    Dropout applies only when ``training``; its mask comes from ``seed`` (drawn from torch's generator if None).
    """
    p = dropout_p if training else 0.0
    if seed is None:
        seed = draw_seed() if p > 0.0 else 0
    return ResidualLayerNorm.apply(x, residual, weight, bias, eps, x_bias, p, seed)


def _types(fn, dtype: torch.dtype, meta: dict) -> dict[str, str]:
    """Triton types of ``fn``'s non-constexpr arguments as the launchers pass them, ``dtype`` data."""
    floats = ("eps", "dropout_p")
    types = {}
    for name in fn.arg_names:
        if name in meta:
            continue
        if name in ("Mean", "Rstd") or name.endswith("Partial"):
            types[name] = "*fp32"
        elif name[0].isupper():
            types[name] = f"*{TYPE_NAMES[dtype]}"
        else:
            # The seed is drawn above 2**32 (int64) for dropout, and 0 (int32) without.
            types[name] = "fp32" if name in floats else "i64" if name == "seed" and meta["DROPOUT"] else "i32"
    return types


def aot_specs() -> list[dict]:
    """Every launch ``launch_meta`` can produce: forward and backward, each data dtype, each tile ``config`` picks
    (one per power-of-two row width) and every flag combination, for the ahead-of-time compile test."""
    specs = []
    widths = [2**k for k in range(7, MAX_COLUMNS.bit_length())]  # 128 ... MAX_COLUMNS: every BLOCK_N
    for backward, fn in ((False, _residual_layer_norm_forward), (True, _residual_layer_norm_backward)):
        for dtype in DTYPES:
            for cols in widths:
                for has_x_bias in (False, True):
                    for second in (False, True):
                        for dropout in (False, True):
                            meta = launch_meta(cols, dtype, backward, has_x_bias, second, dropout)
                            config = {"dtype": TYPE_NAMES[dtype]}
                            config.update({k: v for k, v in meta.items() if k.isupper()})
                            types = _types(fn, dtype, meta)
                            aligned = [name for name in types if name == "cols" or name.startswith("stride")]
                            specs.append(aot_spec(fn, config, meta, types, aligned))
    return dedupe(specs)
