"""DeBERTa's disentangled self-attention: the relative-position math, the plain-PyTorch reference, and a fused
Triton kernel, forward and backward.

Owns the relative-position math (the log-bucketed distance between a query and a key, and the row of the shared
relative-position table it selects) and the attention itself: content-to-content scores plus, per ``pos_att_type``,
content-to-position (each query against the position keys at its bucketed distance to the key) and
position-to-content (each key against the position queries at the same distance), all scaled by
``1 / sqrt(head_dim * (1 + number of position terms))``, then a key padding mask, softmax, dropout and the values.

The reference (``reference``) works on the padded ``[batch, heads, seq, head_dim]`` layout with a boolean key mask
``[batch, seq]`` and builds the full ``[seq, seq]`` score matrix (and a ``[seq, 2 * span]`` one per position term).
A query row whose keys are all masked gets uniform weights over its padded keys there (finite, never NaN); the
model zeroes such rows afterwards. The kernel gives such a row a zero output, as ``attention.py`` does.

The kernel (``disentangled_attention`` for varlen ``[tokens, heads, head_dim]`` batches with ``cu_seqlens``,
``disentangled_attention_padded`` for the reference's layout) is the flash-attention kernel of ``attention.py``
with two more score terms. The table row of a (query i, key j) pair depends only on ``i - j``, so a square tile of
``BLOCK`` queries and ``BLOCK`` keys spans ``2 * BLOCK - 1`` distances (its ``WINDOW``, padded to ``2 * BLOCK``).
Per tile the kernel loads the position keys (queries) of those distances, one table row each (a ``[WINDOW,
head_dim]`` gather from the small ``[2 * span, heads, head_dim]`` table through an int32 row per distance that the
host computes with ``log_bucket`` itself, so the buckets are bit-equal to the reference's on the same device: no
log is taken on the GPU), multiplies them with the query (key) block on the tensor cores into a ``[WINDOW, BLOCK]``
product, and picks each score's term out of it along the tile's diagonal with ``tl.gather``. The backward runs the
same picks in reverse: the score gradients folded onto the distances (another ``tl.gather``) give the extra dQ (dK)
term and, multiplied with the queries (keys), the position-key (position-query) gradient of each distance, which
the dQ (dK/dV) kernel adds with float32 atomics into a ``[2 * max_seqlen - 1, heads, head_dim]`` buffer; the host
folds distances onto table rows with one ``index_add_``. Nothing of size ``[L, L]`` or ``[L, 2 * span]`` is ever
written to memory; the softmax is online, the log-sum-exp is saved, the backward's ``delta`` is attention.py's
kernel, and dropout is regenerated from a philox seed keyed by (sequence, head, query, key) with attention.py's
``_keep``.

Where it stops being good. Matmul work: per square tile a position term costs two ``BLOCK x WINDOW x head_dim``
products (four ``BLOCK x BLOCK`` units) against the content term's one unit, so with both terms the forward does 6
units where flash attention does 2, and the backward 23 where it does 7: about 3x. The unfused sequence does
``2 + 4 * span / L`` units in the forward (one ``[L, 2 * span]`` product per term), below the kernel's 6 whenever
``L > span`` (DeBERTa-v3: span 256): the kernel wins on memory (no ``[L, L]`` or ``[L, 2 * span]`` tensor, written
or read) and on launches, not on FLOPs. Tiles whose distances all fall in the log or clamped region touch
few distinct table rows and still pay for the full window. Registers: the backward kernels hold a ``[BLOCK,
WINDOW]`` product, its fold and a window of the table as a dot operand beside the flash-attention state, and
ptxas spills at 32-wide tiles, so the backward runs 16-wide tiles (the forward 32-wide in fp16/bf16 at head dims
32 and 64), which leaves the tensor cores underfed; ``tl.gather`` lowers to warp shuffles or shared memory, whose
cost on a GPU is unmeasured here. The position-table gradients go through float32 atomics, so they are not
bitwise reproducible run to run (every other output is). ``c2p`` or ``p2c`` alone get their own compiled variants;
neither term is refused (use ``attention.py``). Head dims 32, 64 and 128; fp16 and bf16 use the tensor cores with
float32 accumulation, float32 uses IEEE float32 dots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import attention as _flash
from ._common import DTYPES, TYPE_NAMES, aot_spec, dedupe, dot_precision, draw_seed, interpreting, unit_stride
from ._common import empty as _empty
from .attention import _keep, _operand
from .downcast import to_output

POSITION_TERMS = ("c2p", "p2c")


def log_bucket(distance: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """DeBERTa's log-bucketed relative distance, as integers of ``distance``'s sign.

    Distances with ``|d| <= buckets // 2`` stay as they are; longer ones are compressed logarithmically so that
    ``|d| = max_distance - 1`` lands on ``buckets - 1`` (for even ``buckets``), and farther ones beyond it (the
    table lookup clamps them). Odd in ``d``: ``log_bucket(-d) == -log_bucket(d)``.
    """
    half = buckets // 2
    magnitude = distance.abs()
    # Distances inside the exact band are replaced by half - 1 before the log, so that log(0) is never taken; the
    # final where() keeps their exact value anyway. The arithmetic is float32, in this order, because a bucket is an
    # integer after ceil(): another precision or order moves a distance at a bucket edge into the next bucket, and
    # checkpoints were trained with these edges.
    safe = torch.where(magnitude < half, torch.full_like(magnitude, half - 1), magnitude).to(torch.float32)
    growth = torch.log(torch.tensor((max_distance - 1) / half, dtype=torch.float32, device=distance.device))
    compressed = torch.ceil(torch.log(safe / half) / growth * (half - 1)) + half
    return torch.where(magnitude <= half, distance, (compressed * distance.sign()).to(distance.dtype))


def relative_positions(
    length: int, buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[length, length]`` int64: the (bucketed, when ``buckets > 0``) distance ``i - j`` from query ``i`` to key
    ``j``."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    distance = pos[:, None] - pos[None, :]
    return log_bucket(distance, buckets, max_distance) if buckets > 0 else distance


def position_span(buckets: int, max_distance: int) -> int:
    """Half the height of the relative-position table: the bucket count, or the largest distance without buckets."""
    return buckets if buckets > 0 else max_distance


def relative_index(
    length: int, buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[length, length]`` int64: the row of the ``2 * span`` relative-position table that query ``i`` and key
    ``j`` share, ``clamp(distance(i, j) + span, 0, 2 * span - 1)``. The same row serves both position terms:
    content-to-position reads the position key there, position-to-content the position query."""
    span = position_span(buckets, max_distance)
    return (relative_positions(length, buckets, max_distance, device) + span).clamp_(0, 2 * span - 1)


def score_scale(head_dim: int, position_terms: int) -> float:
    """The factor every score term is multiplied by: ``1 / sqrt(head_dim * (1 + position_terms))``."""
    return 1.0 / math.sqrt(head_dim * (1 + position_terms))


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_index: torch.Tensor,
    pos_key: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    position_terms: int | None = None,
) -> torch.Tensor:
    """Disentangled attention over a padded batch.

    q, k, v: ``[batch, heads, seq, head_dim]``; ``rel_index``: ``[seq, seq]`` rows of the position table
    (``relative_index``); ``pos_key`` / ``pos_query``: ``[heads, 2 * span, head_dim]``, the table projected by the
    key / query projection, or None to leave out content-to-position / position-to-content; ``key_mask``:
    ``[batch, seq]`` True for real tokens, or None; ``dropout_p``: attention-probability dropout (0 at evaluation).
    ``position_terms`` (default: the terms given) sets the scale's count, which transformers takes from the config
    even for a term whose inputs are absent. Returns ``[batch, heads, seq, head_dim]``.
    """
    if position_terms is None:
        position_terms = (pos_key is not None) + (pos_query is not None)
    scale = score_scale(q.shape[-1], position_terms)
    seq = q.shape[-2]
    scores = q @ k.transpose(-1, -2)
    if pos_key is not None:
        # content -> position: query i against the position key of its distance to key j
        to_positions = q @ pos_key.transpose(-1, -2)  # [batch, heads, seq, 2 * span]
        scores = scores + torch.gather(to_positions, -1, rel_index.expand(*to_positions.shape[:-1], seq))
    if pos_query is not None:
        # position -> content: key j against the position query of the same distance, gathered key-major
        from_positions = k @ pos_query.transpose(-1, -2)  # [batch, heads, seq (keys), 2 * span]
        by_key = torch.gather(from_positions, -1, rel_index.t().expand(*from_positions.shape[:-1], seq))
        scores = scores + by_key.transpose(-1, -2)
    scores = scores * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


# The kernel ------------------------------------------------------------------------------------------------------
HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634
AOT_SOURCES = ("attention.py",)  # the helpers (dropout keys, dot operands, the delta kernel) taken from there


def distance_rows(
    max_seqlen: int, buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """int32 ``[2 * max_seqlen - 1]``: the table row of distance ``d = i - j`` at ``d + max_seqlen - 1``, computed
    by ``relative_index``'s own arithmetic (``log_bucket``, plus span, clamped), so that on the same device it
    equals ``relative_index(...)[i, j]`` bit for bit; the kernel reads it instead of taking a log itself."""
    span = position_span(buckets, max_distance)
    distance = torch.arange(-(max_seqlen - 1), max_seqlen, dtype=torch.long, device=device)
    bucketed = log_bucket(distance, buckets, max_distance) if buckets > 0 else distance
    return (bucketed + span).clamp_(0, 2 * span - 1).to(torch.int32)


@triton.jit
def _sequence(CuSeqlens, KLens, b):
    """First token row, number of queries and number of valid keys of sequence ``b`` (the padded layout is a
    varlen batch of equal lengths whose keys stop at ``KLens``)."""
    start = tl.load(CuSeqlens + b)
    q_len = tl.load(CuSeqlens + b + 1) - start
    k_len = tl.load(KLens + b)
    return start, q_len, k_len


@triton.jit
def _window(RelRows, first_m, first_n, max_seqlen, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """The distances ``i - j`` of the tile (queries from ``first_m``, keys from ``first_n``), smallest first, the
    ``BLOCK_M + BLOCK_N - 1`` real ones followed by padding; whether each is inside the distance table; the table
    row of each (row 0 where not)."""
    dist = first_m - first_n - (BLOCK_N - 1) + tl.arange(0, WINDOW)
    inside = (dist > -max_seqlen) & (dist < max_seqlen)
    rel = tl.load(RelRows + (dist + max_seqlen - 1), mask=inside, other=0)
    return dist, inside, rel


@triton.jit
def _diagonal(rows, cols, first_m, first_n, BLOCK_N: tl.constexpr):
    """``[len(rows), len(cols)]``: the window index ``i - j - (first_m - first_n) + BLOCK_N - 1`` of each (query
    ``rows[a]``, key ``cols[b]``) pair, i.e. ``a - b + BLOCK_N - 1``. Written from the loop's own offsets so that it
    is recomputed per tile (a few integer operations) instead of being hoisted out of the loop and held in
    registers, in every layout it is used in, for the whole loop."""
    return rows[:, None] - cols[None, :] - (first_m - first_n) + (BLOCK_N - 1)


@triton.jit
def _table_rows(P, rel, h, stride_r, stride_h, dims, UPCAST: tl.constexpr):
    """``[WINDOW, HEAD_DIM]``: row ``rel[t]`` of head ``h`` of a position table, for every distance of a tile."""
    x = tl.load(P + rel[:, None] * stride_r + h * stride_h + dims[None, :])
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _disentangled_forward(
    Q,
    K,
    V,
    PK,
    PQ,
    RelRows,
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
    stride_pkr,
    stride_pkh,
    stride_pqr,
    stride_pqh,
    stride_ot,
    stride_oh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    dropout_p,
    seed,
    C2P: tl.constexpr,
    P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b)
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
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dist, inside, rel = _window(RelRows, first_m, first_n, max_seqlen, BLOCK_N, WINDOW)
        diagonal = _diagonal(rows, cols, first_m, first_n, BLOCK_N)
        if C2P:
            pk = _table_rows(PK, rel, h, stride_pkr, stride_pkh, dims, UPCAST)
            # [WINDOW, BLOCK_M]: the window on the product's M side, split over warps (as the B operand it would be
            # held whole by every warp), then picked along the diagonal key-major and transposed
            by_key = tl.gather(tl.dot(pk, tl.trans(q), input_precision=DOT_PRECISION), tl.trans(diagonal), axis=0)
            s += tl.trans(by_key)
        if P2C:
            pq = _table_rows(PQ, rel, h, stride_pqr, stride_pqh, dims, UPCAST)
            s += tl.gather(tl.dot(pq, tl.trans(k), input_precision=DOT_PRECISION), diagonal, axis=0)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
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
    tl.store(
        O + tokens[:, None] * stride_ot + h * stride_oh + dims[None, :],
        to_output(acc * scale[:, None], O.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + h * stride_lh + tokens, lse, mask=row_ok)


@triton.jit
def _disentangled_backward_dkdv(
    Q,
    K,
    V,
    PK,
    PQ,
    RelRows,
    DO,
    LSE,
    Delta,
    DK,
    DV,
    DPQ,
    CuSeqlens,
    KLens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pkr,
    stride_pkh,
    stride_pqr,
    stride_pqh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_gr,
    stride_gh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    C2P: tl.constexpr,
    P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    # One program owns BLOCK_N keys and walks every query of the sequence, in the transposed (key-major) frame. The
    # position-to-content term's gradients are the keys': dK gets the position queries, and the position queries
    # of each distance get the keys (added with atomics: every key block meets the same distances).
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b)
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
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        dist, inside, rel = _window(RelRows, first_m, first_n, max_seqlen, BLOCK_N, WINDOW)
        diagonal_t = tl.trans(_diagonal(rows, cols, first_m, first_n, BLOCK_N))
        if C2P:
            pk = _table_rows(PK, rel, h, stride_pkr, stride_pkh, dims, UPCAST)
            s_t += tl.gather(tl.dot(pk, tl.trans(q), input_precision=DOT_PRECISION), diagonal_t, axis=0)
        if P2C:
            pq = _table_rows(PQ, rel, h, stride_pqr, stride_pqh, dims, UPCAST)
            # the window on the product's M side, as in the forward
            by_query = tl.gather(tl.dot(pq, tl.trans(k), input_precision=DOT_PRECISION), tl.trans(diagonal_t), axis=0)
            s_t += tl.trans(by_query)
        p_t = tl.where(col_ok[:, None] & row_ok[None, :], tl.math.exp2(s_t * qk_scale - lse[None, :]), 0.0)
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
        if P2C:
            # [BLOCK_N, WINDOW]: each key's score gradients by distance; at window index t, key b meets query
            # t + b - BLOCK_N + 1 of the block (if there is one)
            fold = (cols[:, None] - first_n) + (dist[None, :] - (first_m - first_n))
            fold_ok = (fold >= 0) & (fold < BLOCK_M)
            fold = tl.minimum(tl.maximum(fold, 0), BLOCK_M - 1)
            by_distance = tl.where(fold_ok, tl.gather(ds_t, fold, axis=1), 0.0)
            by_distance = _operand(by_distance, Q.dtype.element_ty, UPCAST)
            dk += tl.dot(by_distance, pq, input_precision=DOT_PRECISION)
            dpq = tl.dot(tl.trans(by_distance), k, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DPQ + (dist + max_seqlen - 1)[:, None] * stride_gr + h * stride_gh + dims[None, :],
                dpq * sm_scale,
                mask=inside[:, None],
                sem="relaxed",
            )
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
def _disentangled_backward_dq(
    Q,
    K,
    V,
    PK,
    PQ,
    RelRows,
    DO,
    LSE,
    Delta,
    DQ,
    DPK,
    CuSeqlens,
    KLens,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pkr,
    stride_pkh,
    stride_pqr,
    stride_pqh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_gr,
    stride_gh,
    stride_lh,
    heads,
    max_seqlen,
    qk_scale,
    sm_scale,
    dropout_p,
    seed,
    C2P: tl.constexpr,
    P2C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    # One program owns BLOCK_M queries and walks every key of the sequence. The content-to-position term's
    # gradients are the queries': dQ gets the position keys, and the position keys of each distance get the queries.
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    start, q_len, k_len = _sequence(CuSeqlens, KLens, b)
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
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dist, inside, rel = _window(RelRows, first_m, first_n, max_seqlen, BLOCK_N, WINDOW)
        diagonal = _diagonal(rows, cols, first_m, first_n, BLOCK_N)
        if C2P:
            pk = _table_rows(PK, rel, h, stride_pkr, stride_pkh, dims, UPCAST)
            # [WINDOW, BLOCK_M]: the window on the product's M side, split over warps (as the B operand it would be
            # held whole by every warp), then picked along the diagonal key-major and transposed
            by_key = tl.gather(tl.dot(pk, tl.trans(q), input_precision=DOT_PRECISION), tl.trans(diagonal), axis=0)
            s += tl.trans(by_key)
        if P2C:
            pq = _table_rows(PQ, rel, h, stride_pqr, stride_pqh, dims, UPCAST)
            s += tl.gather(tl.dot(pq, tl.trans(k), input_precision=DOT_PRECISION), diagonal, axis=0)
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, rows, first_n, max_seqlen, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_operand(ds, Q.dtype.element_ty, UPCAST), k, input_precision=DOT_PRECISION)
        if C2P:
            # [BLOCK_M, WINDOW]: each query's score gradients by distance; at window index t, query a meets key
            # a - t + BLOCK_N - 1 of the block (if there is one)
            fold = (rows[:, None] - first_m) - (dist[None, :] - (first_m - first_n))
            fold_ok = (fold >= 0) & (fold < BLOCK_N)
            fold = tl.minimum(tl.maximum(fold, 0), BLOCK_N - 1)
            by_distance = tl.where(fold_ok, tl.gather(ds, fold, axis=1), 0.0)
            by_distance = _operand(by_distance, Q.dtype.element_ty, UPCAST)
            dq += tl.dot(by_distance, pk, input_precision=DOT_PRECISION)
            dpk = tl.dot(tl.trans(by_distance), q, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DPK + (dist + max_seqlen - 1)[:, None] * stride_gr + h * stride_gh + dims[None, :],
                dpk * sm_scale,
                mask=inside[:, None],
                sem="relaxed",
            )
    tl.store(
        DQ + tokens[:, None] * stride_dqt + h * stride_dqh + dims[None, :],
        to_output(dq * sm_scale, DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


KERNELS = ("forward", "dkdv", "dq")  # the launches of one forward and one backward (plus attention.py's delta)
# kernel -> head dim -> (BLOCK, num_warps, num_stages); tiles are square (BLOCK_M = BLOCK_N = BLOCK), so a tile's
# distance window (2 * BLOCK - 1 distances) fills a power of two with one slot to spare. Chosen from ptxas's
# register counts over every variant (position terms, dropout) on sm_80 and sm_90 (kernels/aot.py): the backward
# kernels hold a [BLOCK, WINDOW] product, its fold and a window of the table as a dot operand beside the usual
# flash-attention state, so they run 16-wide tiles (32-wide ones spill hundreds of bytes). Where a neighbouring
# choice of warps or stages is named below, ptxas spilled a few bytes with it in some variant.
_TILES = {
    "low": {
        "forward": {32: (32, 8, 2), 64: (32, 8, 2), 128: (16, 4, 2)},
        "dkdv": {32: (16, 8, 2), 64: (16, 4, 2), 128: (16, 8, 2)},  # 32: 4 warps spill (p2c alone, sm_90)
        "dq": {32: (16, 4, 2), 64: (16, 4, 2), 128: (16, 8, 2)},
    },
    "fp32": {
        "forward": {32: (16, 4, 2), 64: (16, 8, 1), 128: (16, 8, 2)},  # 64, 128: 4 warps spill
        "dkdv": {32: (16, 4, 2), 64: (16, 8, 1), 128: (16, 8, 3)},  # 64: 4 warps spill; 128: 2 stages reach 255
        "dq": {32: (16, 8, 2), 64: (16, 8, 3), 128: (16, 4, 2)},  # 32, 64: 4 warps, or 8 with 1-2 stages, spill
    },
}
# (kernel, dtype class, head dim, c2p, p2c, dropout) -> tile where one variant needs its own: float32 dK/dV at head
# dim 128 with position-to-content alone and no dropout spills a few bytes on sm_90 with 8 warps (1 to 4 stages)
# and fits with 4 warps and one stage, which reach the register cap or spill in the other variants.
_TILE_EXCEPTIONS = {("dkdv", "fp32", 128, False, True, False): (16, 4, 1)}


def config(
    head_dim: int,
    kernel: str,
    dtype: torch.dtype = torch.bfloat16,
    c2p: bool = True,
    p2c: bool = True,
    dropout: bool = True,
) -> dict[str, int]:
    """Tile sizes, warps and pipeline stages for ``kernel`` (one of ``KERNELS``) at ``head_dim`` with ``dtype``
    inputs, the given position terms and dropout; no configuration spills (kernels/aot.py compiles each for sm_80
    and sm_90)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"disentangled_attention: head_dim={head_dim} is not one of {HEAD_DIMS}")
    if dtype not in DTYPES:
        raise ValueError(f"disentangled_attention: dtype {dtype} is not float16, bfloat16 or float32")
    if kernel not in KERNELS:
        raise ValueError(f"disentangled_attention: unknown kernel {kernel!r}")
    precision = "fp32" if dtype == torch.float32 else "low"
    variant = (kernel, precision, head_dim, c2p, p2c, dropout)
    tile = _TILE_EXCEPTIONS.get(variant, _TILES[precision][kernel][head_dim])
    block, warps, stages = tile
    return {"BLOCK_M": block, "BLOCK_N": block, "WINDOW": 2 * block, "num_warps": warps, "num_stages": stages}


def launch_meta(
    kernel: str, dtype: torch.dtype, head_dim: int, c2p: bool, p2c: bool, dropout: bool, interpret: bool
) -> dict[str, object]:
    """Every constexpr and launch option of ``kernel``'s launch, as the launchers pass it and ``aot_specs``
    compiles it: ``interpret`` is whether the Triton interpreter runs it (False on a GPU)."""
    meta = {"C2P": c2p, "P2C": p2c, "DROPOUT": dropout, "UPCAST": interpret, "DOT_PRECISION": dot_precision(dtype)}
    return {"HEAD_DIM": head_dim, **meta, **config(head_dim, kernel, dtype, c2p, p2c, dropout)}


def _check(q, k, v, pos_key, pos_query, rel_rows, max_seqlen, dropout_p):
    """ValueError naming the field for what the kernel cannot serve."""
    total, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"disentangled_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match"
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"disentangled_attention: head_dim={head_dim} is not one of {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"disentangled_attention: dtype {q.dtype} is not float16, bfloat16 or float32 for q, k, v")
    if pos_key is None and pos_query is None:
        raise ValueError("disentangled_attention: pos_key and pos_query are both None; use attention.py")
    for name, table in (("pos_key", pos_key), ("pos_query", pos_query)):
        if table is None:
            continue
        if table.dim() != 3 or table.shape[1:] != (heads, head_dim) or table.dtype != q.dtype:
            raise ValueError(
                f"disentangled_attention: {name} {tuple(table.shape)} {table.dtype} is not [2 * span, {heads}, "
                f"{head_dim}] {q.dtype}"
            )
        if table.shape[0] * heads * head_dim >= 2**31:
            raise ValueError(f"disentangled_attention: {name} has {table.shape[0]} rows, too many for int32 offsets")
    if (2 * max_seqlen - 1) * heads * head_dim >= 2**31:
        raise ValueError(
            f"disentangled_attention: max_seqlen={max_seqlen} is too long for the int32 offsets of the gradient by "
            "distance"
        )
    if rel_rows.shape != (2 * max_seqlen - 1,) or rel_rows.dtype != torch.int32:
        raise ValueError(f"disentangled_attention: rel_rows {tuple(rel_rows.shape)} is not [2 * max_seqlen - 1]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"disentangled_attention: dropout_p={dropout_p} is not in [0, 1)")


def forward(q, k, v, pos_key, pos_query, cu_seqlens, k_lens, max_seqlen, rel_rows, dropout_p, sm_scale, seed):
    """``(out, lse)`` over ``[tokens, heads, head_dim]``; ``pos_key`` / ``pos_query`` ``[2 * span, heads,
    head_dim]`` or None; ``k_lens`` the valid keys of each sequence; ``rel_rows`` from ``distance_rows``."""
    _check(q, k, v, pos_key, pos_query, rel_rows, max_seqlen, dropout_p)
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    out = _empty((total, heads, head_dim), q.dtype, q.device)
    lse = _empty((heads, total), torch.float32, q.device)
    c2p, p2c = pos_key is not None, pos_query is not None
    pk, pq = pos_key if c2p else q, pos_query if p2c else q  # an absent table is never read
    meta = launch_meta("forward", q.dtype, head_dim, c2p, p2c, dropout_p > 0.0, interpreting())
    if total and batch:
        _disentangled_forward[(triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch * heads)](
            q,
            k,
            v,
            pk,
            pq,
            rel_rows,
            out,
            lse,
            cu_seqlens,
            k_lens,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            pk.stride(0),
            pk.stride(1),
            pq.stride(0),
            pq.stride(1),
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


def _fold_distances(by_distance: torch.Tensor, rel_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A table's gradient from its gradient by distance (float32 ``[2 * max_seqlen - 1, heads, head_dim]``): the
    distances that share a table row (the log buckets, the clamped ends) summed onto it, in float32, then rounded
    once to the table's dtype."""
    grad = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    return grad.index_add_(0, rel_rows.long(), by_distance).to(table.dtype)


def backward(
    do, q, k, v, pos_key, pos_query, out, lse, cu_seqlens, k_lens, max_seqlen, rel_rows, dropout_p, sm_scale, seed
):
    """``(dq, dk, dv, d pos_key, d pos_query)``, the last two None for an absent table."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    do = unit_stride(do)
    c2p, p2c = pos_key is not None, pos_query is not None
    pk, pq = pos_key if c2p else q, pos_query if p2c else q
    dq = _empty((total, heads, head_dim), q.dtype, q.device)
    dk = _empty((total, heads, head_dim), q.dtype, q.device)
    dv = _empty((total, heads, head_dim), q.dtype, q.device)
    dk.zero_()  # keys past a sequence's valid ones get no program, and their gradient is zero
    dv.zero_()
    delta = _empty((heads, total), torch.float32, q.device)
    # Gradients by distance, summed by atomics over every tile, sequence and (for dpq) key block that meets them.
    dpk = _empty((2 * max_seqlen - 1, heads, head_dim), torch.float32, q.device).zero_() if c2p else delta
    dpq = _empty((2 * max_seqlen - 1, heads, head_dim), torch.float32, q.device).zero_() if p2c else delta
    if total and batch:
        delta_meta = _flash.launch_meta("delta", q.dtype, head_dim, False, False, interpreting())
        _flash._attention_backward_delta[(triton.cdiv(max_seqlen, delta_meta["BLOCK_M"]), batch * heads)](
            out,
            do,
            delta,
            cu_seqlens,
            cu_seqlens,
            out.stride(0),
            out.stride(1),
            do.stride(0),
            do.stride(1),
            delta.stride(0),
            heads,
            max_seqlen,
            **delta_meta,
        )
        inputs = (q, k, v, pk, pq, rel_rows, do, lse, delta)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        strides += (pk.stride(0), pk.stride(1), pq.stride(0), pq.stride(1), do.stride(0), do.stride(1))
        common = (heads, max_seqlen, sm_scale * LOG2E, sm_scale, dropout_p, seed)
        grad_strides = (heads * head_dim, head_dim, lse.stride(0))

        def meta(kernel: str) -> dict[str, object]:
            return launch_meta(kernel, q.dtype, head_dim, c2p, p2c, dropout_p > 0.0, interpreting())

        dkdv_meta = meta("dkdv")
        _disentangled_backward_dkdv[(triton.cdiv(max_seqlen, dkdv_meta["BLOCK_N"]), batch * heads)](
            *inputs,
            dk,
            dv,
            dpq,
            cu_seqlens,
            k_lens,
            *strides,
            dk.stride(0),
            dk.stride(1),
            dv.stride(0),
            dv.stride(1),
            *grad_strides,
            *common,
            **dkdv_meta,
        )
        dq_meta = meta("dq")
        _disentangled_backward_dq[(triton.cdiv(max_seqlen, dq_meta["BLOCK_M"]), batch * heads)](
            *inputs,
            dq,
            dpk,
            cu_seqlens,
            k_lens,
            *strides,
            dq.stride(0),
            dq.stride(1),
            *grad_strides,
            *common,
            **dq_meta,
        )
    else:
        dq.zero_()
    dpk = _fold_distances(dpk, rel_rows, pos_key) if c2p else None
    dpq = _fold_distances(dpq, rel_rows, pos_query) if p2c else None
    return dq, dk, dv, dpk, dpq


class DisentangledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, cu_seqlens, k_lens, max_seqlen, rel_rows, dropout_p, sm_scale, seed):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        pos_key = None if pos_key is None else unit_stride(pos_key)
        pos_query = None if pos_query is None else unit_stride(pos_query)
        args = (cu_seqlens, k_lens, max_seqlen, rel_rows, dropout_p, sm_scale, seed)
        out, lse = forward(q, k, v, pos_key, pos_query, *args)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, cu_seqlens, k_lens, rel_rows)
        ctx.args = (max_seqlen, dropout_p, sm_scale, seed)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_key, pos_query, out, lse, cu_seqlens, k_lens, rel_rows = ctx.saved_tensors
        max_seqlen, dropout_p, sm_scale, seed = ctx.args
        grads = backward(
            do,
            q,
            k,
            v,
            pos_key,
            pos_query,
            out,
            lse,
            cu_seqlens,
            k_lens,
            max_seqlen,
            rel_rows,
            dropout_p,
            sm_scale,
            seed,
        )
        return (*grads, None, None, None, None, None, None, None)


def _scale_and_seed(head_dim, pos_key, pos_query, position_terms, dropout_p, seed):
    if position_terms is None:
        position_terms = (pos_key is not None) + (pos_query is not None)
    if seed is None:
        seed = draw_seed() if dropout_p > 0.0 else 0
    return score_scale(head_dim, position_terms), seed


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    position_buckets: int,
    max_relative_positions: int,
    dropout_p: float = 0.0,
    position_terms: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """The kernel over a varlen batch: q, k, v ``[total_tokens, heads, head_dim]``, int32 ``cu_seqlens``
    ``[batch + 1]``, ``max_seqlen`` at least the longest sequence (a Python int); ``pos_key`` / ``pos_query``
    ``[2 * span, heads, head_dim]`` (the relative-position table through the key / query projection) or None to
    leave that term out; ``position_buckets`` / ``max_relative_positions`` as in ``relative_index``;
    ``position_terms`` as in ``reference``. Dropout masks come from ``seed`` (drawn from torch's generator if
    None)."""
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"disentangled_attention: cu_seqlens dtype {cu_seqlens.dtype} must be torch.int32")
    scale, seed = _scale_and_seed(q.shape[-1], pos_key, pos_query, position_terms, dropout_p, seed)
    rel_rows = distance_rows(max_seqlen, position_buckets, max_relative_positions, q.device)
    k_lens = cu_seqlens[1:] - cu_seqlens[:-1]
    return DisentangledAttention.apply(
        q, k, v, pos_key, pos_query, cu_seqlens, k_lens, max_seqlen, rel_rows, dropout_p, scale, seed
    )


def disentangled_attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    position_buckets: int,
    max_relative_positions: int,
    dropout_p: float = 0.0,
    position_terms: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """The kernel in ``reference``'s layout: q, k, v ``[batch, heads, seq, head_dim]``, ``pos_key`` / ``pos_query``
    ``[heads, 2 * span, head_dim]`` or None, ``key_mask`` ``[batch, seq]`` True (or 1) for real tokens and
    right-padded, or None. Queries at padding positions are computed too; a sequence with no real token gets a zero
    output (the reference gives it uniform weights over its padding). Returns ``[batch, heads, seq, head_dim]``."""
    batch, heads, seq, head_dim = q.shape
    if key_mask is None:
        k_lens = torch.full((batch,), seq, dtype=torch.int32, device=q.device)
    else:
        if key_mask.shape != (batch, seq):
            raise ValueError(f"disentangled_attention: key_mask shape {tuple(key_mask.shape)} != {(batch, seq)}")
        keep = key_mask.bool()
        k_lens = keep.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(seq, device=q.device)[None, :] < k_lens[:, None]
        if not torch.equal(prefix, keep):
            bad = int((prefix != keep).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"disentangled_attention: key_mask row {bad} is not right-padded")
    scale, seed = _scale_and_seed(head_dim, pos_key, pos_query, position_terms, dropout_p, seed)
    rel_rows = distance_rows(seq, position_buckets, max_relative_positions, q.device)
    cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    flat = [x.transpose(1, 2).reshape(batch * seq, heads, head_dim) for x in (q, k, v)]
    tables = [None if t is None else t.transpose(0, 1) for t in (pos_key, pos_query)]
    out = DisentangledAttention.apply(*flat, *tables, cu_seqlens, k_lens, seq, rel_rows, dropout_p, scale, seed)
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


# The ahead-of-time compile -------------------------------------------------------------------------------------
_FUNCTIONS = {
    "forward": _disentangled_forward,
    "dkdv": _disentangled_backward_dkdv,
    "dq": _disentangled_backward_dq,
}
TERMS = ((True, False), (False, True), (True, True))  # (c2p, p2c): every combination the launchers accept
# Token and head strides of q, k, v, o and their gradients, and the row and head strides of the position tables
# (views of a [2 * span, hidden] projection): multiples of 16 elements at DeBERTa's widths.
_ALIGNED = tuple(f"stride_{t}{d}" for t in ("q", "k", "v", "o", "do", "dk", "dv", "dq") for d in ("t", "h"))
_ALIGNED += ("stride_pkr", "stride_pkh", "stride_pqr", "stride_pqh", "stride_gr", "stride_gh")


def _types(fn, dtype: torch.dtype, meta: dict) -> dict[str, str]:
    """Triton types of ``fn``'s non-constexpr arguments as the launchers pass them, ``dtype`` inputs."""
    types = {}
    for name in fn.arg_names:
        if name in meta:
            continue
        if name in ("LSE", "Delta", "DPK", "DPQ"):
            types[name] = "*fp32"
        elif name in ("CuSeqlens", "KLens", "RelRows"):
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


def aot_specs() -> list[dict]:
    """Every launch ``launch_meta`` can produce on a GPU: each kernel, input dtype, head dim, position terms and
    dropout on or off (the delta launch is attention.py's, in its specs)."""
    specs = []
    for kernel, fn in _FUNCTIONS.items():
        for dtype in DTYPES:
            for head_dim in HEAD_DIMS:
                for c2p, p2c in TERMS:
                    for dropout in (False, True):
                        meta = launch_meta(kernel, dtype, head_dim, c2p, p2c, dropout, interpret=False)
                        config = {"kernel": kernel, "dtype": TYPE_NAMES[dtype], "head_dim": head_dim}
                        config.update(c2p=c2p, p2c=p2c, dropout=dropout)
                        config.update({k: v for k, v in meta.items() if k.startswith("BLOCK") or k == "WINDOW"})
                        types = _types(fn, dtype, meta)
                        aligned = [name for name in _ALIGNED if name in types]
                        specs.append(aot_spec(fn, config, meta, types, aligned))
    return dedupe(specs)
