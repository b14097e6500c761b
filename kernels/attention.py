"""Bidirectional flash attention over an unpadded (varlen) batch or a right-padded one, forward and backward.

Owns the forward kernel (online softmax, saved log-sum-exp, never an S x S matrix in memory), the backward kernels
(``delta = rowsum(dO * O)``, then one kernel for dK/dV walking the queries and one for dQ walking the keys, so no
atomics), the launchers and the autograd.Function. Layout: ``[tokens, heads, head_dim]`` with any token and head
strides (the model passes views of its fused QKV projection) and ``cu_seqlens`` offsets; the padded layout
``[batch, seq, heads, head_dim]`` with a key padding mask goes through the same kernels with every sequence
``seq`` long and a per-sequence number of valid keys. Head dims 32, 64 and 128; fp16 and bf16 inputs use the
tensor cores with float32 accumulation; float32 inputs use IEEE float32 dots. Attention dropout draws from a
philox seed keyed by (sequence, head, query, key), so the backward regenerates the mask instead of storing it.

Where it stops being good: one program per (query block, sequence, head), sized for ``max_seqlen``, so a batch
mixing very short and very long sequences leaves programs idle; sequences far beyond a few thousand tokens want
split-K style parallelism over keys in the forward, which this kernel does not do. A query with no valid key (a
fully padded row) gets a zero output and zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import DTYPES, TYPE_NAMES, aot_spec, dedupe, dot_precision, draw_seed, interpreting, unit_stride
from ._common import empty as _empty
from .downcast import to_output

HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634


@triton.jit
def _sequence(CuSeqlens, KLens, b, max_seqlen, PADDED: tl.constexpr):
    """First token row, number of queries and number of keys of sequence ``b``."""
    if PADDED:
        start = b * max_seqlen
        q_len = max_seqlen
        k_len = tl.load(KLens + b)
    else:
        start = tl.load(CuSeqlens + b)
        q_len = tl.load(CuSeqlens + b + 1) - start
        k_len = q_len
    return start, q_len, k_len


@triton.jit
def _keep(seed, bh, rows, first_col, max_seqlen, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of sequence-head ``bh`` for queries ``rows`` (``BLOCK_M``) and the ``BLOCK_N`` keys from
    ``first_col`` (a multiple of 4), query-major. Each philox call gives four numbers, spent on four adjacent keys:
    a quarter of the random-number work (and of its registers) of one call per score."""
    quads = first_col // 4 + tl.arange(0, BLOCK_N // 4)
    offsets = (bh.to(tl.int64) * max_seqlen + rows.to(tl.int64))[:, None] * ((max_seqlen + 3) // 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """A float32 tile rounded to the inputs' dtype for a ``tl.dot``, kept in float32 under the interpreter (whose
    low-precision arithmetic is unreliable) so that it computes what the GPU computes."""
    x = to_output(x, dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attention_forward(
    Q,
    K,
    V,
    O,
    LSE,
    CuSeqlens,
    KLens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    dropout_p,
    seed,
    PADDED: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b, max_seqlen, PADDED)
    first_m = tl.program_id(0) * BLOCK_M
    if first_m >= q_len:
        return
    rows = first_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    tokens = (start + rows).to(tl.int64)
    q = tl.load(Q + tokens[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # Scores live in base 2 (scaled by log2(e)) so the exponentials are exp2. The running max starts finite so
    # that a row with no valid key stays 0 instead of turning into NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for first_n in range(0, k_len, BLOCK_N):
        cols = first_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        key_tokens = (start + cols).to(tl.int64)
        k = tl.load(
            K + key_tokens[:, None] * stride_kt + h * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            V + key_tokens[:, None] * stride_vt + h * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, rows, first_n, max_seqlen, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        p = _operand(p, Q.dtype.element_ty, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0.0
    scale = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    if DROPOUT:
        scale = scale / (1.0 - dropout_p)
    out = acc * scale[:, None]
    tl.store(
        O + tokens[:, None] * stride_ot + h * stride_oh + dims[None, :],
        to_output(out, O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lh + tokens, lse, mask=row_ok)


@triton.jit
def _attention_backward_delta(
    O,
    DO,
    Delta,
    CuSeqlens,
    KLens,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dh,
    heads,
    max_seqlen,
    PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b, max_seqlen, PADDED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    tokens = (start + rows).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(O + tokens[:, None] * stride_ot + h * stride_oh + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tokens[:, None] * stride_dot + h * stride_doh + dims[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + h * stride_dh + tokens, delta, mask=row_ok)


@triton.jit
def _attention_backward_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DK,
    DV,
    CuSeqlens,
    KLens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    PADDED: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_N keys and walks every query of the sequence, in the transposed (key-major) frame.
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b, max_seqlen, PADDED)
    first_n = tl.program_id(0) * BLOCK_N
    if first_n >= k_len:
        return
    cols = first_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    dims = tl.arange(0, HEAD_DIM)
    key_tokens = (start + cols).to(tl.int64)
    k = tl.load(K + key_tokens[:, None] * stride_kt + h * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + key_tokens[:, None] * stride_vt + h * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for first_m in range(0, q_len, BLOCK_M):
        rows = first_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        tokens = (start + rows).to(tl.int64)
        q = tl.load(Q + tokens[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(
            DO + tokens[:, None] * stride_dot + h * stride_doh + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + h * stride_lh + tokens, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + h * stride_lh + tokens, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], tl.math.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep_t = tl.trans(_keep(seed, bh, rows, first_n, max_seqlen, dropout_p, BLOCK_M, BLOCK_N))
            inv_keep = 1.0 / (1.0 - dropout_p)
            p_dropped = _operand(tl.where(keep_t, p_t * inv_keep, 0.0), Q.dtype.element_ty, UPCAST)
            dv += tl.dot(p_dropped, do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            dv += tl.dot(_operand(p_t, Q.dtype.element_ty, UPCAST), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(_operand(ds_t, Q.dtype.element_ty, UPCAST), q, input_precision=DOT_PRECISION)
    tl.store(
        DK + key_tokens[:, None] * stride_dkt + h * stride_dkh + dims[None, :],
        to_output(dk * sm_scale, DK.dtype.element_ty),
        mask=col_ok[:, None],
    )
    tl.store(
        DV + key_tokens[:, None] * stride_dvt + h * stride_dvh + dims[None, :],
        to_output(dv, DV.dtype.element_ty),
        mask=col_ok[:, None],
    )


@triton.jit
def _attention_backward_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DQ,
    CuSeqlens,
    KLens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    PADDED: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns BLOCK_M queries and walks every key of the sequence.
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b, max_seqlen, PADDED)
    first_m = tl.program_id(0) * BLOCK_M
    if first_m >= q_len:
        return
    rows = first_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    tokens = (start + rows).to(tl.int64)
    q = tl.load(Q + tokens[:, None] * stride_qt + h * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tokens[:, None] * stride_dot + h * stride_doh + dims[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + h * stride_lh + tokens, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + h * stride_lh + tokens, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for first_n in range(0, k_len, BLOCK_N):
        cols = first_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        key_tokens = (start + cols).to(tl.int64)
        k = tl.load(
            K + key_tokens[:, None] * stride_kt + h * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            V + key_tokens[:, None] * stride_vt + h * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, rows, first_n, max_seqlen, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_operand(ds, Q.dtype.element_ty, UPCAST), k, input_precision=DOT_PRECISION)
    tl.store(
        DQ + tokens[:, None] * stride_dqt + h * stride_dqh + dims[None, :],
        to_output(dq * sm_scale, DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


KERNELS = ("forward", "delta", "dkdv", "dq")  # the launches of one forward and one backward
DELTA_BLOCK_M = 64
# kernel -> head dim -> (BLOCK_M, BLOCK_N, num_warps) for float32 inputs
_FLOAT32_TILES = {
    "forward": {32: (32, 32, 4), 64: (64, 32, 8), 128: (32, 32, 8)},
    "dkdv": {32: (32, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)},
    "dq": {32: (64, 32, 8), 64: (64, 32, 8), 128: (16, 16, 8)},
}


def config(head_dim: int, kernel: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Tile sizes, warps and pipeline stages for ``kernel`` (one of ``KERNELS``) at ``head_dim`` with ``dtype``
    inputs."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim={head_dim} is not one of {HEAD_DIMS}")
    if dtype not in DTYPES:
        raise ValueError(f"attention: dtype {dtype} is not float16, bfloat16 or float32")
    if kernel == "delta":
        return {"BLOCK_M": DELTA_BLOCK_M, "num_warps": 4}
    # Sized so that no configuration spills with dropout on (the philox state per score is the register hog);
    # kernels/aot.py compiles each of them for sm_80 and sm_90. Float32 inputs take IEEE dots on the CUDA cores,
    # whose operands and products live in registers, so their tiles are smaller or spread over more warps.
    if dtype == torch.float32:
        block_m, block_n, warps = _FLOAT32_TILES[kernel][head_dim]
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "num_warps": warps,
            "num_stages": 2,
        }
    warps = 4 if head_dim <= 32 else 8
    if kernel == "forward":
        # At head dim 128, three stages of K and V tiles spill 20 bytes on sm_80 (without dropout); two do not.
        return {
            "BLOCK_M": 64,
            "BLOCK_N": 32,
            "num_warps": 4 if head_dim <= 64 else 8,
            "num_stages": 3 if head_dim <= 64 else 2,
        }
    if kernel == "dkdv":
        return {"BLOCK_M": 32, "BLOCK_N": 32 if head_dim == 128 else 64, "num_warps": warps, "num_stages": 2}
    if kernel == "dq":
        return {"BLOCK_M": 64, "BLOCK_N": 16 if head_dim == 128 else 32, "num_warps": warps, "num_stages": 2}
    raise ValueError(f"attention: unknown kernel {kernel!r}")


def launch_meta(
    kernel: str, dtype: torch.dtype, head_dim: int, padded: bool, dropout: bool, interpret: bool
) -> dict[str, object]:
    """Every constexpr and launch option of ``kernel``'s launch, as the launchers pass it (``**launch_meta(...)``)
    and ``aot_specs`` compiles it: ``interpret`` is whether the Triton interpreter runs it (False on a GPU)."""
    meta = {"PADDED": padded, "HEAD_DIM": head_dim}
    if kernel != "delta":
        meta.update(DROPOUT=dropout, UPCAST=interpret, DOT_PRECISION=dot_precision(dtype))
    return {**meta, **config(head_dim, kernel, dtype)}


def forward(q, k, v, cu_seqlens, k_lens, max_seqlen, dropout_p, sm_scale, seed):
    """``(out, lse)``; ``k_lens`` is None for the varlen layout and the valid-key counts for the padded one."""
    total, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: dtype {q.dtype} is not float16, bfloat16 or float32")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p={dropout_p} is not in [0, 1)")
    batch = cu_seqlens.numel() - 1
    out = _empty((total, heads, head_dim), q.dtype, q.device)
    lse = _empty((heads, total), torch.float32, q.device)
    meta = launch_meta("forward", q.dtype, head_dim, k_lens is not None, dropout_p > 0.0, interpreting())
    grid = (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)
    if total and batch:
        _attention_forward[grid](
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            cu_seqlens if k_lens is None else k_lens,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            heads,
            max_seqlen,
            sm_scale * LOG2E,
            dropout_p,
            seed,
            **meta,
        )
    return out, lse


def backward(do, q, k, v, out, lse, cu_seqlens, k_lens, max_seqlen, dropout_p, sm_scale, seed):
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    do = unit_stride(do)
    padded = k_lens is not None
    dq = _empty((total, heads, head_dim), q.dtype, q.device)
    dk = _empty((total, heads, head_dim), q.dtype, q.device)
    dv = _empty((total, heads, head_dim), q.dtype, q.device)
    if padded:  # keys past each sequence's valid length get no program, and their gradient is zero
        dk.zero_()
        dv.zero_()
    delta = _empty((heads, total), torch.float32, q.device)
    if not (total and batch):
        return dq, dk, dv
    k_lens = cu_seqlens if k_lens is None else k_lens

    def meta(kernel: str) -> dict[str, object]:
        return launch_meta(kernel, q.dtype, head_dim, padded, dropout_p > 0.0, interpreting())

    delta_meta = meta("delta")
    _attention_backward_delta[(triton.cdiv(max_seqlen, delta_meta["BLOCK_M"]), batch * heads)](
        out,
        do,
        delta,
        cu_seqlens,
        k_lens,
        out.stride(0),
        out.stride(1),
        do.stride(0),
        do.stride(1),
        delta.stride(0),
        heads,
        max_seqlen,
        **delta_meta,
    )
    common = (heads, max_seqlen, sm_scale * LOG2E, sm_scale, dropout_p, seed)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    dkdv_meta = meta("dkdv")
    _attention_backward_dkdv[(triton.cdiv(max_seqlen, dkdv_meta["BLOCK_N"]), batch * heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens,
        k_lens,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
        *common,
        **dkdv_meta,
    )
    dq_meta = meta("dq")
    _attention_backward_dq[(triton.cdiv(max_seqlen, dq_meta["BLOCK_M"]), batch * heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        cu_seqlens,
        k_lens,
        *strides,
        dq.stride(0),
        dq.stride(1),
        lse.stride(0),
        *common,
        **dq_meta,
    )
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, k_lens, max_seqlen, dropout_p, sm_scale, seed):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        out, lse = forward(q, k, v, cu_seqlens, k_lens, max_seqlen, dropout_p, sm_scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, k_lens)
        ctx.args = (max_seqlen, dropout_p, sm_scale, seed)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens, k_lens = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, out, lse, cu_seqlens, k_lens, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Varlen attention: q, k, v ``[total_tokens, heads, head_dim]``, int32 ``cu_seqlens`` ``[batch + 1]``,
    ``max_seqlen`` at least the longest sequence. Dropout masks come from ``seed`` (drawn from torch's generator
    if None)."""
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"attention: cu_seqlens dtype {cu_seqlens.dtype} must be torch.int32")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if seed is None:
        seed = draw_seed() if dropout_p > 0.0 else 0
    return FlashAttention.apply(q, k, v, cu_seqlens, None, max_seqlen, dropout_p, scale, seed)


def attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Padded attention: q, k, v ``[batch, seq, heads, head_dim]``; ``key_padding_mask`` ``[batch, seq]`` is True
    (or 1) for real tokens and must be right-padded (each row a run of real tokens, then padding). Queries at
    padding positions are computed too, as in the usual padded implementations."""
    batch, seq, heads, head_dim = q.shape
    if key_padding_mask is None:
        k_lens = torch.full((batch,), seq, dtype=torch.int32, device=q.device)
    else:
        if key_padding_mask.shape != (batch, seq):
            raise ValueError(f"attention: key_padding_mask shape {tuple(key_padding_mask.shape)} != {(batch, seq)}")
        keep = key_padding_mask.bool()
        k_lens = keep.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(seq, device=q.device)[None, :] < k_lens[:, None]
        if not torch.equal(prefix, keep):
            bad = int((prefix != keep).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"attention: key_padding_mask row {bad} is not right-padded")
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    if seed is None:
        seed = draw_seed() if dropout_p > 0.0 else 0
    flat = [x.reshape(batch * seq, heads, head_dim) for x in (q, k, v)]
    out = FlashAttention.apply(*flat, cu_seqlens, k_lens, seq, dropout_p, scale, seed)
    return out.view(batch, seq, heads, head_dim)


def reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, keep=None, dropout_p=0.0):
    """The varlen definition the kernel is tested against, one sequence at a time; ``keep`` is an explicit dropout
    mask ``[batch, heads, max_seqlen, max_seqlen]`` of 0/1 (query-major), or None."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    outs = []
    for b in range(cu_seqlens.numel() - 1):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        qs, ks, vs = (x[lo:hi].transpose(0, 1).float() for x in (q, k, v))  # [heads, n, head_dim]
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        if keep is not None:
            probs = probs * keep[b, :, : hi - lo, : hi - lo] / (1.0 - dropout_p)
        outs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outs).to(q.dtype) if outs else q.new_zeros(q.shape)


def reference_low_precision(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None):
    """Torch's own attention in the inputs' dtype (SDPA per sequence), the yardstick of low-precision error."""
    outs = []
    for b in range(cu_seqlens.numel() - 1):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        qs, ks, vs = (x[lo:hi].transpose(0, 1)[None] for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)[0].transpose(0, 1))
    return torch.cat(outs)


def _types(fn, dtype: torch.dtype, meta: dict) -> dict[str, str]:
    """Triton types of ``fn``'s non-constexpr arguments as the launchers pass them, ``dtype`` inputs."""
    types = {}
    for name in fn.arg_names:
        if name in meta:
            continue
        if name in ("LSE", "Delta"):
            types[name] = "*fp32"
        elif name in ("CuSeqlens", "KLens"):
            types[name] = "*i32"
        elif name[0].isupper():
            types[name] = f"*{TYPE_NAMES[dtype]}"
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            types[name] = "fp32"
        elif name == "seed":  # drawn above 2**32 (int64) for dropout, 0 (int32) without
            types[name] = "i64" if meta["DROPOUT"] else "i32"
        else:
            types[name] = "i32"
    return types


_FUNCTIONS = {
    "forward": _attention_forward,
    "delta": _attention_backward_delta,
    "dkdv": _attention_backward_dkdv,
    "dq": _attention_backward_dq,
}
# Token and head strides of q, k, v, o and their gradients: multiples of 16 elements at BERT's widths (heads of 32,
# 64 or 128 in a fused QKV projection); not the log-sum-exp and delta strides (the token count).
_ALIGNED = tuple(f"stride_{t}{d}" for t in ("q", "k", "v", "o", "do", "dk", "dv", "dq") for d in ("t", "h"))


def aot_specs() -> list[dict]:
    """Every launch ``launch_meta`` can produce on a GPU: each kernel, input dtype, head dim, layout (varlen or
    padded) and dropout on or off, for the ahead-of-time compile test."""
    specs = []
    for kernel, fn in _FUNCTIONS.items():
        for dtype in DTYPES:
            for head_dim in HEAD_DIMS:
                for padded in (False, True):
                    for dropout in (False, True):
                        meta = launch_meta(kernel, dtype, head_dim, padded, dropout, interpret=False)
                        config = {"kernel": kernel, "dtype": TYPE_NAMES[dtype], "head_dim": head_dim}
                        config.update(padded=padded, dropout=meta.get("DROPOUT", False))
                        config.update({k: v for k, v in meta.items() if k.startswith("BLOCK")})
                        types = _types(fn, dtype, meta)
                        aligned = [name for name in _ALIGNED if name in types]
                        specs.append(aot_spec(fn, config, meta, types, aligned))
    return dedupe(specs)
