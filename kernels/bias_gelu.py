"""``GELU(x + bias)`` with the exact erf GELU (BERT's activation), forward and backward in Triton.

Owns the tiled elementwise kernels, their launchers and the autograd.Function. The forward saves ``x`` and ``bias``
(not the activation) and the backward recomputes ``x + bias``; it writes ``dx`` and per-tile partial sums of
``dbias`` that torch adds up, so no atomics are needed. It is memory-bound by design: at best it moves each byte
once, which is all a standalone elementwise op can do. Where it stops being good: when ``x`` comes straight out of
a matmul, a GEMM epilogue that applies bias and GELU would save the round trip to memory; this kernel cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import DTYPES, PARTIAL_ROWS, TYPE_NAMES, aot_spec, as_rows, dedupe
from ._common import empty as _empty
from .downcast import to_output


@triton.jit
def _bias_gelu_forward(X, Bias, Y, rows, cols, stride_x, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (row[:, None] < rows) & (col[None, :] < cols)
    row64 = row.to(tl.int64)
    x = tl.load(X + row64[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + col, mask=col < cols, other=0.0).to(tl.float32)
    z = x + b[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(Y + row64[:, None] * stride_y + col[None, :], to_output(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward(
    DY,
    X,
    Bias,
    DX,
    DBiasPartial,
    rows,
    cols,
    stride_dy,
    stride_x,
    stride_dx,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (p, c) walks row tiles p, p + P, p + 2P, ... of column tile c and writes one partial dbias row.
    pid_m = tl.program_id(0)
    programs_m = tl.num_programs(0)
    col = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(Bias + col, mask=col < cols, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid_m, tl.cdiv(rows, BLOCK_M), programs_m):
        row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (row[:, None] < rows) & (col[None, :] < cols)
        row64 = row.to(tl.int64)
        x = tl.load(X + row64[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        z = x + b[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dx = tl.where(mask, dy * (cdf + z * pdf), 0.0)
        tl.store(DX + row64[:, None] * stride_dx + col[None, :], to_output(dx, DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)
    tl.store(DBiasPartial + pid_m * cols + col, dbias, mask=col < cols)


def config(cols: int) -> dict[str, int]:
    """Tile shape and warps for rows of ``cols`` elements: 4096 elements per program (16 per thread), narrow or
    wide tiles."""
    block_n = 128 if cols <= 128 else 1024
    return {"BLOCK_M": 4096 // block_n, "BLOCK_N": block_n, "num_warps": 8}


def launch_meta(cols: int, dtype: torch.dtype) -> dict[str, int]:
    """Every constexpr and launch option of the forward and the backward at rows of ``cols`` elements, as the
    launchers pass it and ``aot_specs`` compiles it."""
    if dtype not in DTYPES:
        raise ValueError(f"bias_gelu: dtype {dtype} is not one of {DTYPES}")
    return config(cols)


def forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias shape {tuple(bias.shape)} does not match x's last dim {x.shape[-1]}")
    x2 = as_rows(x)
    rows, cols = x2.shape
    y = _empty((rows, cols), x.dtype, x.device)
    meta = launch_meta(cols, x.dtype)
    grid = (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]))
    if rows:
        _bias_gelu_forward[grid](x2, bias.contiguous(), y, rows, cols, x2.stride(0), y.stride(0), **meta)
    return y.view(x.shape)


def backward(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2, dy2 = as_rows(x), as_rows(dy)
    rows, cols = x2.shape
    dx = _empty((rows, cols), x.dtype, x.device)
    meta = launch_meta(cols, x.dtype)
    grid = (min(triton.cdiv(rows, meta["BLOCK_M"]), PARTIAL_ROWS), triton.cdiv(cols, meta["BLOCK_N"]))
    partial = _empty((grid[0], cols), torch.float32, x.device)
    if rows:
        _bias_gelu_backward[grid](
            dy2, x2, bias.contiguous(), dx, partial, rows, cols, dy2.stride(0), x2.stride(0), dx.stride(0), **meta
        )
    dbias = partial.sum(dim=0).to(bias.dtype) if rows else torch.zeros_like(bias)
    return dx.view(x.shape), dbias


def reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The definition the kernel is tested against."""
    return F.gelu(x + bias)


class BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, bias)
        return forward(x, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias = ctx.saved_tensors
        return backward(dy, x, bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU(x + bias)`` (exact erf form) over the last dimension of ``x``."""
    return BiasGelu.apply(x, bias)


def aot_specs() -> list[dict]:
    """Every launch ``launch_meta`` can produce (the narrow and the wide tile, forward and backward), for each data
    dtype, for the ahead-of-time compile test."""
    specs = []
    for dtype in DTYPES:
        for cols in (128, 1024):  # the narrow and the wide tile
            meta = launch_meta(cols, dtype)
            config = {"dtype": TYPE_NAMES[dtype], "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"]}
            for fn in (_bias_gelu_forward, _bias_gelu_backward):
                types = {
                    name: "*fp32" if name == "DBiasPartial" else f"*{TYPE_NAMES[dtype]}" if name[0].isupper() else "i32"
                    for name in fn.arg_names
                    if name not in meta
                }
                aligned = [name for name in types if name == "cols" or name.startswith("stride")]
                specs.append(aot_spec(fn, config, meta, types, aligned, unaligned_too=True))
    return dedupe(specs)
