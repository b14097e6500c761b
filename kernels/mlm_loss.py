"""The row kernel of the masked-LM loss over the tied decoder: per row of logits, cross-entropy, top-1 hit, the
gradient written over the logits in place and, on request, a token drawn from the row's softmax (Gumbel-max).

Owns the Triton kernel, its one launcher ``loss_rows`` (one block of rows) and the ahead-of-time specs. The host
loop that cuts the masked rows into blocks of at most ``CHUNK_ELEMENTS // V`` rows, computes each block's logits
``h @ W.T + b`` with one cuBLAS matmul, calls ``loss_rows`` and turns the gradient block into ``d_hidden``,
``d_weight`` and ``d_bias`` is ``fastbert.ops``' (one loop for this kernel and for the torch reference, which has
the same per-block contract). The kernel walks each row's vocabulary in ``BLOCK_V`` chunks twice: first an online
log-sum-exp with the target logit, the running argmax and, with ``SAMPLE``, the running argmax of
``logit + gumbel``; then the gradient of the mean loss, ``(softmax - onehot) / labelled_rows``, over the logits.

Sampling: ``argmax_v(z_v + g_v)`` with independent standard Gumbel ``g_v`` is a draw from ``softmax(z)``, so the
draw costs one more compare per logit and never needs the normalised probabilities; ``argmax_v(z_v + T g_v)`` is a
draw from ``softmax(z / T)``, ELECTRA's generator sampled at temperature ``T`` (``gumbel_scale``). The noise is a pure
function of the row's int64 key and the vocabulary id, computed identically here, in the interpreter and by the
torch twin ``fastbert.ops.gumbel_noise`` (the definition; tests hold the two together), with 32-bit integer
arithmetic only:

    lo, hi   = the low and high 32-bit halves of the key (two's complement)
    mix(x)   = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16 (mod 2^32)
    seed     = mix(lo ^ mix(hi))                               once per row
    bits     = mix(seed ^ mix(v))                              per vocabulary id v
    u        = ((bits >> 9) + 1/2) / 2^23                      in (0, 1), exact in float32 (24 significant bits)
    g        = -log(-log(u))

Only float32 ``log`` may differ by an ulp between the GPU, numpy and torch, so draws agree unless two scores are
within ulps of each other. ``u`` takes 2^23 values, which caps ``g`` at about 16.6 (a tail of probability 6e-8).

Where it stops being good: the logits round-trip through memory once per pass (a matmul-fused kernel would keep
them on chip, at the price of writing its own GEMM); bf16 logits carry bf16 rounding, as any bf16 matmul's output
does, and the draw is from the softmax of those rounded logits. Labels must be in ``[0, V)`` or ``-100``; others are
not checked (checking would cost a device sync) and give a garbage loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, TYPE_NAMES, aot_spec, dedupe
from .downcast import to_output

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits elements per block of rows (in the input dtype: 16 MiB of bf16)
BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit
def _lowbias32(x):
    """The 32-bit finaliser of the module docstring's ``mix`` on uint32 (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _mlm_loss_rows(
    Logits,
    Labels,
    InvDenom,
    Loss,
    Correct,
    RowKeys,
    Samples,
    vocab,
    stride_l,
    gumbel_scale,
    IGNORE_INDEX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    logits = Logits + row.to(tl.int64) * stride_l
    label = tl.load(Labels + row).to(tl.int32)
    lanes = tl.arange(0, BLOCK_V)
    # Lane-wise running max, sum of exponentials and best (value, index); combined across lanes at the end.
    lane_max = tl.full((BLOCK_V,), -1.0e30, dtype=tl.float32)
    lane_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_V,), dtype=tl.int32)
    drawn = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    drawn_index = tl.zeros((BLOCK_V,), dtype=tl.int32)
    target = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if SAMPLE:
        key = tl.load(RowKeys + row)
        seed = _lowbias32(key.to(tl.uint32) ^ _lowbias32((key >> 32).to(tl.uint32)))
    for start in range(0, vocab, BLOCK_V):
        col = start + lanes
        ok = col < vocab
        z = tl.load(logits + col, mask=ok, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, z)
        lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(z - new_max)
        lane_max = new_max
        better = z > best
        best_index = tl.where(better, col, best_index)
        best = tl.where(better, z, best)
        target += tl.where(col == label, z, 0.0)
        if SAMPLE:
            bits = _lowbias32(seed ^ _lowbias32(col.to(tl.uint32)))
            u = (bits >> 9).to(tl.float32) * (1.0 / 8388608.0) + (1.0 / 16777216.0)
            score = z - gumbel_scale * tl.log(-tl.log(u))  # -inf past the vocabulary, so those lanes never win
            won = score > drawn
            drawn_index = tl.where(won, col, drawn_index)
            drawn = tl.where(won, score, drawn)
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    top = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    valid = label != IGNORE_INDEX
    tl.store(Loss + row, tl.where(valid, lse - tl.sum(target, axis=0), 0.0))
    tl.store(Correct + row, tl.where(valid & (argmax == label), 1.0, 0.0))
    if SAMPLE:
        top_score = tl.max(drawn, axis=0)
        tl.store(Samples + row, tl.min(tl.where(drawn == top_score, drawn_index, vocab), axis=0).to(tl.int64))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(InvDenom), 0.0)
        for start in range(0, vocab, BLOCK_V):
            col = start + lanes
            ok = col < vocab
            z = tl.load(logits + col, mask=ok, other=0.0).to(tl.float32)
            grad = (tl.exp(z - lse) - tl.where(col == label, 1.0, 0.0)) * scale
            tl.store(logits + col, to_output(grad, Logits.dtype.element_ty), mask=ok)


def launch_meta(dtype: torch.dtype, write_grad: bool, sample: bool) -> dict[str, object]:
    """Every constexpr and launch option of the row kernel for ``dtype`` logits, as ``loss_rows`` passes it and
    ``aot_specs`` compiles it: ``write_grad`` when some input wants a gradient (the logits are then overwritten),
    ``sample`` when a Gumbel-max draw is asked for."""
    if dtype not in DTYPES:
        raise ValueError(f"mlm_loss: dtype {dtype} is not one of {DTYPES}")
    return {
        "IGNORE_INDEX": IGNORE_INDEX,
        "WRITE_GRAD": write_grad,
        "SAMPLE": sample,
        "BLOCK_V": BLOCK_V,
        "num_warps": NUM_WARPS,
    }


def loss_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_denom: torch.Tensor,
    row_keys: torch.Tensor | None,
    loss: torch.Tensor,
    correct: torch.Tensor,
    samples: torch.Tensor | None,
    write_grad: bool,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """One block of rows: ``logits`` ``[rows, V]`` (unit column stride), ``labels`` int64 ``[rows]``,
    ``inv_denom`` float32 ``[1]`` (one over the labelled rows of the whole batch). Writes each row's cross-entropy
    (0 for an ignored row) into ``loss``, its top-1 hit (1.0 or 0.0) into ``correct`` (float32 ``[rows]`` each)
    and, given ``row_keys`` int64 ``[rows]``, its Gumbel-max draw at ``temperature`` (``argmax(logit + temperature *
    gumbel)``, a draw from ``softmax(logits / temperature)``) into ``samples`` (int64 ``[rows]``). With
    ``write_grad`` the logits are overwritten by the gradient of the mean loss and returned; else None."""
    sample = row_keys is not None
    meta = launch_meta(logits.dtype, write_grad, sample)
    # Without SAMPLE the kernel neither reads RowKeys nor writes Samples; the labels fill both int64 slots.
    _mlm_loss_rows[(logits.shape[0],)](
        logits,
        labels,
        inv_denom,
        loss,
        correct,
        row_keys if sample else labels,
        samples if sample else labels,
        logits.shape[1],
        logits.stride(0),
        float(temperature),
        **meta,
    )
    return logits if write_grad else None


def aot_specs() -> list[dict]:
    """The one tile configuration, for each logits dtype, with and without the gradient pass and the draw, for
    the ahead-of-time compile test."""
    types = {"Labels": "*i64", "InvDenom": "*fp32", "Loss": "*fp32", "Correct": "*fp32", "RowKeys": "*i64"}
    types.update(Samples="*i64", vocab="i32", stride_l="i32", gumbel_scale="fp32")
    specs = []
    for dtype in DTYPES:
        for write_grad in (False, True):
            for sample in (False, True):
                meta = launch_meta(dtype, write_grad, sample)
                config = {"dtype": TYPE_NAMES[dtype], "WRITE_GRAD": write_grad, "SAMPLE": sample, "BLOCK_V": BLOCK_V}
                logits = {"Logits": f"*{TYPE_NAMES[dtype]}", **types}
                specs.append(aot_spec(_mlm_loss_rows, config, meta, logits, ("vocab", "stride_l"), unaligned_too=True))
    return dedupe(specs)
