"""The model's fused operations, one function each: ``attention`` (and ``attention_padded``),
``residual_layer_norm``, ``bias_gelu``, ``mlm_loss`` (and ``mlm_loss_and_sample``), and ``lamb_kernel`` for the
optimizer.

Each function takes plain tensors and picks an implementation: the Triton kernel from ``fastbert.kernels`` for CUDA
tensors when that kernel exists, the torch reference otherwise. ``FASTBERT_BACKEND=torch`` forces the reference;
``FASTBERT_BACKEND=triton`` forces the kernel (with ``TRITON_INTERPRET=1`` it then runs on CPU tensors) and is an
error for an op whose kernel is not there. The references here are the definitions the kernels are tested against,
and they are written to be fast on CPU: attention goes through SDPA, and ``mlm_loss`` takes the masked rows in
blocks so that no ``[M, V]`` logits tensor ever exists. That block loop is the MLM loss's only host loop: the
Triton path runs it too, with the kernel's per-block function in place of the reference's.
"""

from __future__ import annotations

import importlib
import math
import os
from functools import cache

import torch
import torch.nn.functional as F

from fastbert.config import IGNORE_INDEX  # also importable from here, as it was before it moved to config

_BACKENDS = ("auto", "torch", "triton")


def backend_setting() -> str:
    value = os.environ.get("FASTBERT_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"FASTBERT_BACKEND={value!r} is not one of {_BACKENDS}")
    return value


@cache
def triton_kernel(op: str):
    """The ``fastbert.kernels.<op>`` module, or None when that kernel or Triton itself is unavailable."""
    try:
        return importlib.import_module(f"fastbert.kernels.{op}")
    except ImportError:
        return None


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device`` without waiting for the device: a plain ``.to("cuda")`` synchronizes
    the stream after its copy, which in a training step stalls the host behind the queued kernels. On CUDA the copy
    goes from pinned memory, asynchronously (torch's pinned allocator keeps the buffer until the copy is done)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _kernel_for(op: str, tensor: torch.Tensor):
    setting = backend_setting()
    if setting == "torch" or (setting == "auto" and not tensor.is_cuda):
        return None
    kernel = triton_kernel(op)
    if kernel is None and setting == "triton":
        raise RuntimeError(f"FASTBERT_BACKEND=triton but the Triton kernel for {op!r} is not available")
    return kernel


# Dropout --------------------------------------------------------------------------------------------------------
def dropout_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The multiplier of inverted dropout: 0 for a dropped element, ``1 / (1 - p)`` for a kept one.

    Each element takes 16 random bits (four per random int64 word), several times cheaper on CPU than
    ``bernoulli_``; ``p`` is rounded to a multiple of 1/65536 and the scale is exact for the rounded rate, so the
    expectation is preserved. The mask is built with integer clamps rather than boolean ops, which are slow on CPU.
    Draws come from torch's generator for ``device``, so seeding and RNG state capture work as usual.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    drops = round(p * 65536)
    first_kept = drops - 32768  # lanes are uniform over [-32768, 32767]; those below first_kept are dropped
    lanes = words.view(torch.int16)[:numel].view(shape)
    keep = lanes.clamp(first_kept - 1, first_kept).sub_(first_kept - 1)  # 0 = dropped, 1 = kept; no overflow
    return keep.to(dtype).mul_(65536 / (65536 - drops))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the mask from ``dropout_mask``."""
    if not training or p == 0.0:
        return x
    return x * dropout_mask(x.shape, p, x.device, x.dtype)


# Attention ------------------------------------------------------------------------------------------------------
def varlen_token_index(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> torch.Tensor:
    """For each of the ``total`` tokens of an unpadded batch, its row in the padded ``[B * max_seqlen]`` layout
    (``total`` comes from the caller, so sizing the result reads nothing back from the device)."""
    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    batch = torch.repeat_interleave(torch.arange(seqlens.numel(), device=cu_seqlens.device), seqlens, output_size=total)
    position = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[batch]
    return batch * max_seqlen + position


def _masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    dropout_p: float,
    softmax_scale: float | None,
) -> torch.Tensor:
    """SDPA over ``[B, heads, S, head_dim]`` with ``keep`` ``[B, S]`` True for the keys each sequence may see (every
    row must keep at least one); dropout through ``dropout``, not SDPA's own."""
    mask = keep[:, None, None, :]
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    # SDPA's own dropout on CPU draws with bernoulli_, the slowest part of a training step
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    scores = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(dropout(scores, dropout_p), v)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Varlen attention by padding to ``[B, heads, max_seqlen, head_dim]`` and calling SDPA with a key mask."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    index = varlen_token_index(cu_seqlens, max_seqlen, total)

    def pad(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, index, x)
        return padded.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    # An empty sequence keeps its first key visible so that its (unused) row of the softmax is not 0/0.
    keep = torch.arange(max_seqlen, device=q.device)[None, :] < seqlens.clamp(min=1)[:, None]
    out = _masked_attention(pad(q), pad(k), pad(v), keep, dropout_p, softmax_scale)
    return out.transpose(1, 2).reshape(batch * max_seqlen, heads, head_dim).index_select(0, index)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention over an unpadded batch.

    q, k, v: ``[total_tokens, heads, head_dim]``; ``cu_seqlens``: int32 ``[batch + 1]`` offsets of each sequence;
    ``max_seqlen``: the longest sequence (a Python int). Tokens attend only within their own sequence. Returns
    ``[total_tokens, heads, head_dim]``.
    """
    kernel = _kernel_for("attention", q)
    if kernel is not None:
        return kernel.attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return attention_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def attention_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional attention over a padded batch: q, k, v ``[batch, seq, heads, head_dim]``;
    ``key_padding_mask`` ``[batch, seq]`` True (or 1) for real tokens, right-padded (the kernel checks), or None.
    Queries at padding positions are computed too; a sequence with no real token gets a zero output. Returns
    ``[batch, seq, heads, head_dim]``."""
    kernel = _kernel_for("attention", q)
    if kernel is not None:
        return kernel.attention_padded(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    batch, seq = q.shape[:2]
    if key_padding_mask is None:
        keep = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    else:
        keep = key_padding_mask.bool()
    has_key = keep.any(dim=1)
    keep = keep | (~has_key[:, None] & (torch.arange(seq, device=q.device) == 0))  # no 0/0 softmax row
    out = _masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), keep, dropout_p, softmax_scale)
    return out.transpose(1, 2) * has_key[:, None, None, None].to(out.dtype)


# Disentangled attention (DeBERTa) ---------------------------------------------------------------------------------
_DISENTANGLED_BLOCK = 1 << 21  # score elements ([batch, heads, query rows, keys]) per query block
# Up to this many score elements the reference's whole-matrix autograd runs (faster, its memory still small); above,
# the blocked function (the reference keeps several [B, H, L, L] tensors a layer for its backward pass).
_DISENTANGLED_WHOLE = 1 << 23


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place."""
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


def _disentangled_scores(q, k, pos_key, from_positions, index, key_mask, scale):
    """Scores (float32, or float64 for float64 inputs) of one query block: ``q [B, H, b, D]`` against every key,
    plus content-to-position (``q`` at the position key of each pair's table row ``index [b, L]``) and
    position-to-content (``from_positions [B, H, 2s, L]``: every position query against every key, read at the same
    rows; laid out position-major so that the block's read is a gather down its rows, in the scores' own layout)."""
    batch, heads, rows, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(compute)
    if pos_key is not None:
        to_positions = (q @ pos_key.transpose(-1, -2)).to(compute)
        scores += torch.gather(to_positions, -1, index.expand(batch, heads, rows, keys))
    if from_positions is not None:
        scores += torch.gather(from_positions, -2, index.expand(batch, heads, rows, keys))
    scores *= scale
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores


def relative_index(length: int, buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """``fastbert.kernels.disentangled_attention.relative_index``, equal to it, from the ``2 * length - 1`` distinct
    distances (``distance_rows``: one log a distance) looked up by ``i - j``, instead of a log for each of the
    ``length**2`` pairs (a quarter of a second at 2048 tokens on a CPU core)."""
    from fastbert.kernels import disentangled_attention as dsa

    if length == 0:
        return torch.zeros(0, 0, dtype=torch.long, device=device)
    rows = dsa.distance_rows(length, buckets, max_distance, device).long()
    pos = torch.arange(length, dtype=torch.long, device=device)
    return rows[pos[:, None] - pos[None, :] + (length - 1)]


class _BlockedDisentangledAttention(torch.autograd.Function):
    """Disentangled attention one block of query rows at a time: each block's scores against every key, their softmax
    and the block's output, so that no ``[B, H, L, L]`` tensor (nor the reference's gathered copies of it) lives
    longer than a block. A block holds whole rows, so the backward pass recomputes each block's scores and softmax
    exactly as the forward pass did (nothing but the inputs and the output is saved) and draws its dropout mask
    again from the saved RNG state."""

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, rel_index, key_mask, dropout_p, scale):
        batch, heads, length = q.shape[0], q.shape[1], q.shape[2]
        block = max(16, min(length, _DISENTANGLED_BLOCK // max(1, batch * heads * k.shape[2])))
        compute = torch.promote_types(q.dtype, torch.float32)
        from_positions = None if pos_query is None else (pos_query @ k.transpose(-1, -2)).to(compute)
        rng = torch.get_rng_state() if dropout_p > 0 else None
        out = torch.empty_like(q)
        for start in range(0, length, block):
            rows = slice(start, start + block)
            scores = _disentangled_scores(q[:, :, rows], k, pos_key, from_positions, rel_index[rows], key_mask, scale)
            probs = _softmax_(scores)
            if dropout_p > 0:
                probs *= dropout_mask(probs.shape, dropout_p, probs.device, compute)
            out[:, :, rows] = (probs.to(v.dtype) @ v).to(out.dtype)
        ctx.save_for_backward(q, k, v, pos_key, pos_query, rel_index, key_mask, out)
        ctx.dropout_p, ctx.scale, ctx.block, ctx.rng = dropout_p, scale, block, rng
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pos_key, pos_query, rel_index, key_mask, out = ctx.saved_tensors
        p, scale, block = ctx.dropout_p, ctx.scale, ctx.block
        length = q.shape[2]
        c = torch.promote_types(q.dtype, torch.float32)
        qc, kc, vc = q.to(c), k.to(c), v.to(c)
        from_positions = None if pos_query is None else pos_query.to(c) @ kc.transpose(-1, -2)
        delta = (grad_out.to(c) * out.to(c)).sum(-1)
        dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
        d_pos_key = None if pos_key is None else torch.zeros_like(pos_key, dtype=c)
        d_from = None if from_positions is None else torch.zeros_like(from_positions)
        with torch.random.fork_rng(devices=[], enabled=p > 0):
            if p > 0:
                torch.set_rng_state(ctx.rng)
            for start in range(0, length, block):
                rows = slice(start, start + block)
                qb, gb, index = qc[:, :, rows], grad_out[:, :, rows].to(c), rel_index[rows]
                pos_key_c = None if pos_key is None else pos_key.to(c)
                scores = _disentangled_scores(qb, kc, pos_key_c, from_positions, index, key_mask, scale)
                probs = _softmax_(scores)
                d_probs = gb @ vc.transpose(-1, -2)
                if p > 0:
                    keep = dropout_mask(probs.shape, p, probs.device, c)
                    dv += (probs * keep).transpose(-1, -2) @ gb
                    d_probs *= keep
                else:
                    dv += probs.transpose(-1, -2) @ gb
                d_scores = probs.mul_(d_probs.sub_(delta[:, :, rows, None])).mul_(scale)  # [B, H, b, L]
                if key_mask is not None:  # masked scores are constants (all of a row with no real key)
                    d_scores.masked_fill_(~key_mask[:, None, None, :], 0.0)
                dq_block = d_scores @ kc
                dk += d_scores.transpose(-1, -2) @ qb
                if pos_key is not None:
                    to_rows = torch.zeros(*d_scores.shape[:3], pos_key.shape[1], dtype=c, device=q.device)
                    to_rows.scatter_add_(-1, index.expand_as(d_scores), d_scores)
                    dq_block += to_rows @ pos_key_c
                    d_pos_key += torch.einsum("bhir,bhid->hrd", to_rows, qb)
                if d_from is not None:
                    d_from.scatter_add_(-2, index.expand_as(d_scores), d_scores)
                dq[:, :, rows] = dq_block
        d_pos_query = None
        if d_from is not None:
            dk += d_from.transpose(-1, -2) @ pos_query.to(c)
            d_pos_query = torch.einsum("bhrj,bhjd->hrd", d_from, kc)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (
            cast(dq, q), cast(dk, k), cast(dv, v), cast(d_pos_key, pos_key), cast(d_pos_query, pos_query),
            None, None, None, None,
        )  # fmt: skip


def uses_kernel(op: str, tensor: torch.Tensor) -> bool:
    """Whether ``op`` runs its Triton kernel for ``tensor`` (its device and ``FASTBERT_BACKEND``)."""
    return _kernel_for(op, tensor) is not None


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_index: torch.Tensor | None,
    pos_key: torch.Tensor | None = None,
    pos_query: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    position_terms: int | None = None,
    position_buckets: int | None = None,
    max_relative_positions: int | None = None,
) -> torch.Tensor:
    """DeBERTa's attention with ``fastbert.kernels.disentangled_attention.reference``'s arguments and result. Past
    ``_DISENTANGLED_WHOLE`` score elements (long sequences) it runs by query blocks
    (``_BlockedDisentangledAttention``), the same function with memory linear in the sequence length beyond one
    block's scores; below, and with ``FASTBERT_BACKEND=torch``, the reference itself. On CUDA tensors (or with
    ``FASTBERT_BACKEND=triton``) the fused Triton kernel runs instead; it takes the bucket settings
    (``position_buckets``, ``max_relative_positions``) and needs no ``rel_index`` (None), which the torch paths build
    from them when not given. ``key_mask`` must then be right-padded."""
    from fastbert.kernels import disentangled_attention as dsa

    kernel = _kernel_for("disentangled_attention", q)
    if kernel is not None:
        if position_buckets is None or max_relative_positions is None:
            raise ValueError("the disentangled attention kernel needs position_buckets and max_relative_positions")
        return kernel.disentangled_attention_padded(
            q, k, v, pos_key, pos_query, key_mask, position_buckets, max_relative_positions, dropout_p, position_terms
        )
    if rel_index is None:
        if position_buckets is None or max_relative_positions is None:
            raise ValueError("disentangled_attention needs rel_index or the bucket settings to build it")
        rel_index = relative_index(q.shape[2], position_buckets, max_relative_positions, q.device)

    whole = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _DISENTANGLED_WHOLE
    if backend_setting() == "torch" or whole:
        return dsa.reference(q, k, v, rel_index, pos_key, pos_query, key_mask, dropout_p, position_terms)
    if position_terms is None:
        position_terms = (pos_key is not None) + (pos_query is not None)
    scale = dsa.score_scale(q.shape[-1], position_terms)
    mask = None if key_mask is None else key_mask.bool()
    if mask is not None and q.device.type == "cpu" and bool(mask.all()):
        mask = None  # no padding: skip the masking (a host read, which costs nothing on the CPU)
    return _BlockedDisentangledAttention.apply(q, k, v, pos_key, pos_query, rel_index, mask, dropout_p, scale)


# Residual + LayerNorm -------------------------------------------------------------------------------------------
def residual_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(dropout(x + x_bias) + residual)``.

    Returns ``(normalized, summed)``: the post-LN output and the pre-norm sum, which pre-LN layers carry as their
    residual stream.
    """
    kernel = _kernel_for("residual_layer_norm", x)
    if kernel is not None:
        return kernel.residual_layer_norm(x, residual, weight, bias, eps, x_bias, dropout_p, training)
    if x_bias is not None:
        x = x + x_bias
    x = dropout(x, dropout_p, training)
    summed = x if residual is None else x + residual
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps), summed


# Bias + GELU ----------------------------------------------------------------------------------------------------
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``GELU(x + bias)``; exact erf GELU by default, BERT's activation."""
    kernel = _kernel_for("bias_gelu", x)
    if kernel is not None and approximate == "none":
        return kernel.bias_gelu(x, bias)
    return F.gelu(x + bias, approximate=approximate)


# LAMB -----------------------------------------------------------------------------------------------------------
def lamb_kernel(param: torch.Tensor):
    """The fused multi-tensor LAMB step (``fastbert.kernels.lamb``) for parameters like ``param``, or None when the
    step should run on torch's foreach ops (the reference, in ``fastbert.optim.Lamb``). The step spans many tensors
    and several launches with host work in between (ZeRO all-reduces), so the optimizer drives the kernel module
    itself rather than calling one function here."""
    return _kernel_for("lamb", param)


# MLM loss -------------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 22  # logits elements per block of rows on the reference path: 16 MiB of float32
_MASK32 = 0xFFFFFFFF
_NOISE_ROWS = 8  # rows of Gumbel noise the reference draws at once


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, in two 16-bit halves of the constant so that
    no int64 product overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser (lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(row_keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """The standard Gumbel noise of ``mlm_loss_and_sample``: float32 ``[rows, ids]`` for int64 ``row_keys``
    ``[rows]`` and int64 ``vocab_ids`` ``[ids]``, a pure function of each (key, id) pair.

    With ``mix`` the lowbias32 finaliser on 32-bit words, ``lo``/``hi`` the halves of the key: ``seed =
    mix(lo ^ mix(hi))``, ``bits = mix(seed ^ mix(id))``, ``u = ((bits >> 9) + 1/2) / 2**23`` and ``g =
    -log(-log(u))``. The Triton kernel (``fastbert.kernels.mlm_loss``) computes the same integers; only float32
    ``log`` may differ by an ulp. ``argmax(logits + g)`` is then a draw from ``softmax(logits)``.
    """
    seed = _lowbias32((row_keys & _MASK32) ^ _lowbias32((row_keys >> 32) & _MASK32))
    bits = _lowbias32(seed[:, None] ^ _lowbias32(vocab_ids & _MASK32)[None, :])
    u = (bits >> 9).to(torch.float32).mul_(2.0**-23).add_(2.0**-24)
    return u.log_().neg_().log_().neg_()


def _mlm_rows_reference(logits, labels, inv_denom, row_keys, loss, correct, samples, write_grad, temperature=1.0):
    """The torch twin of ``fastbert.kernels.mlm_loss.loss_rows`` (same arguments and outputs) in ``inv_denom``'s
    dtype; the gradient comes back as a new tensor in the logits' dtype (the logits are overwritten as scratch)."""
    rows, vocab = logits.shape
    z = logits.to(inv_denom.dtype)
    valid = labels != IGNORE_INDEX
    safe_labels = torch.where(valid, labels, 0)
    if samples is not None:  # a few rows at a time: their int64 hashing stays in cache (3x faster than all at once)
        vocab_ids = torch.arange(vocab, device=logits.device)
        for start in range(0, rows, _NOISE_ROWS):
            noise = gumbel_noise(row_keys[start : start + _NOISE_ROWS], vocab_ids)
            if temperature != 1.0:
                noise.mul_(temperature)
            torch.argmax(noise.add_(z[start : start + _NOISE_ROWS]), dim=1, out=samples[start : start + _NOISE_ROWS])
    top, predicted = z.max(dim=1)  # the first maximum, as argmax picks it
    target = z.gather(1, safe_labels[:, None]).squeeze(1)
    # One exp pass serves both the log-sum-exp and the gradient: exp(logits - max), in place of the logits.
    exp = z.sub_(top[:, None]).exp_()
    total = exp.sum(dim=1)
    torch.mul(top + total.log() - target, valid, out=loss)
    torch.logical_and(predicted == safe_labels, valid, out=correct)
    if not write_grad:
        return None
    weight_row = valid.to(z.dtype) * inv_denom
    grad = exp.mul_((weight_row / total)[:, None])  # softmax, scaled by each row's share of the mean
    grad[torch.arange(rows, device=grad.device), safe_labels] -= weight_row
    return grad.to(logits.dtype)


def _row_block(chunk_elements: int, vocab: int) -> int:
    """Rows per block of ``_MLMLoss``: as many as ``chunk_elements`` logits hold, rounded down to a multiple of 4
    once 4 fit, so that every block's float32 row outputs start 16-byte aligned, the alignment the Triton kernel is
    specialised and compiled ahead of time for (an unaligned start would make Triton build another variant)."""
    block = max(1, chunk_elements // max(vocab, 1))
    return block - block % 4 if block >= 4 else block


class _MLMLoss(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T + bias`` against labels, one block of rows at a time: the one host loop
    of the Triton path and the reference alike, which differ only in ``rows`` (the per-block function:
    ``fastbert.kernels.mlm_loss.loss_rows`` or ``_mlm_rows_reference``) and the block size.

    A block holds at most ``chunk_elements // V`` rows (``_row_block``); its logits come from one matmul in the
    input dtype, and ``rows`` leaves each row's loss, hit and draw and returns the gradient of the mean loss, which
    two matmuls turn into ``d_hidden`` and ``d_weight`` (``d_bias`` is its float32 column sum). So the forward does
    all the work (three matmuls, no recomputation), no ``[M, V]`` tensor ever exists, and the backward only scales
    the saved gradients by the incoming ``grad_loss``. They are kept as a ctx attribute, not saved tensors, and
    scaled in place, so autograd takes them as the ``.grad`` without copying ``d_weight`` (``V x E``, the largest
    tensor); a second backward through the same graph is refused.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_keys, rows, chunk_elements, temperature):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"mlm_loss: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [M, E] and [V, E]"
            )
        count, vocab = hidden.shape[0], weight.shape[0]
        if bias.shape != (vocab,) or labels.shape != (count,):
            raise ValueError(
                f"mlm_loss: bias {tuple(bias.shape)} must be ({vocab},) and labels {tuple(labels.shape)} must be "
                f"({count},)"
            )
        if row_keys is not None and (row_keys.shape != (count,) or row_keys.dtype != torch.int64):
            raise ValueError(f"mlm_loss: row_keys {tuple(row_keys.shape)} {row_keys.dtype} must be int64 ({count},)")
        device, dtype = hidden.device, hidden.dtype
        labels = labels.contiguous()  # the kernel indexes labels, keys and draws by row
        row_keys = None if row_keys is None else row_keys.contiguous()
        compute = torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 model
        want = tuple(ctx.needs_input_grad[:3])
        inv_denom = (labels != IGNORE_INDEX).sum().clamp(min=1).to(compute).reciprocal().reshape(1)
        loss_rows = torch.empty(count, dtype=compute, device=device)
        correct_rows = torch.empty(count, dtype=compute, device=device)
        samples = None if row_keys is None else torch.empty(count, dtype=torch.int64, device=device)
        d_hidden = torch.empty(hidden.shape, dtype=dtype, device=device) if want[0] else None
        d_weight = torch.zeros_like(weight) if want[1] else None
        d_bias = torch.zeros(vocab, dtype=compute, device=device) if want[2] else None
        block = _row_block(chunk_elements, vocab)
        for start in range(0, count, block):
            stop = min(start + block, count)
            h = hidden[start:stop]
            logits = torch.addmm(bias, h, weight.t())
            grad = rows(
                logits,
                labels[start:stop],
                inv_denom,
                None if row_keys is None else row_keys[start:stop],
                loss_rows[start:stop],
                correct_rows[start:stop],
                None if samples is None else samples[start:stop],
                any(want),
                temperature,
            )
            if d_hidden is not None:
                torch.mm(grad, weight, out=d_hidden[start:stop])
            if d_weight is not None:
                d_weight.addmm_(grad.t(), h)
            if d_bias is not None:
                d_bias += grad.sum(dim=0, dtype=compute)
        ctx.grads = (d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype))
        loss = loss_rows.sum() * inv_denom[0]
        accuracy = correct_rows.sum() * inv_denom[0]
        ctx.mark_non_differentiable(accuracy)
        if samples is None:
            return loss, accuracy
        ctx.mark_non_differentiable(samples)
        return loss, accuracy, samples

    @staticmethod
    def backward(ctx, grad_loss, *_grad_accuracy_and_samples):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "mlm_loss: backward ran twice through the same graph; its gradients are computed in "
                "the forward and handed over once (retain_graph=True is not supported)"
            )
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None, None, None, None, None)


def _mlm_loss(hidden, weight, bias, labels, row_keys, temperature=1.0):
    kernel = _kernel_for("mlm_loss", hidden)
    if kernel is None:
        rows, chunk = _mlm_rows_reference, _CHUNK_ELEMENTS
    else:
        rows, chunk = kernel.loss_rows, kernel.CHUNK_ELEMENTS
    return _MLMLoss.apply(hidden, weight, bias, labels, row_keys, rows, chunk, temperature)


def mlm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM cross-entropy from the transformed hidden states at masked positions.

    hidden ``[M, E]``, decoder weight ``[V, E]`` (tied to the word embeddings), bias ``[V]``, labels ``[M]``
    (``-100`` is ignored). Returns ``(mean loss over labelled rows, top-1 accuracy)``; the accuracy is detached.
    Zero labelled rows give a loss of 0 with zero gradients, not NaN.
    """
    return _mlm_loss(hidden, weight, bias, labels, None)


def mlm_loss_and_sample(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    row_keys: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mlm_loss`` (the same two results, the same gradients) plus, for each row, a token drawn from the softmax
    of its logits: ELECTRA's generator loss and its replacements in one pass over the vocabulary.

    ``row_keys`` int64 ``[M]``: one key per row (the caller derives it, e.g. with SplitMix64 from seed, epoch,
    sample and position); the draw is the Gumbel-max ``argmax(logits + gumbel_noise(key, vocab ids))``, so the
    same keys give the same tokens. Returns ``(loss, accuracy, samples)``, ``samples`` int64 ``[M]`` with no
    gradient; an ignored row (``-100``) still gets a draw. ``temperature`` (a positive float) draws from
    ``softmax(logits / temperature)`` instead, as ``argmax(logits + temperature * noise)``; the loss and its
    gradients stay those of ``softmax(logits)``.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"mlm_loss_and_sample: temperature {temperature} must be a positive finite number")
    return _mlm_loss(hidden, weight, bias, labels, row_keys, float(temperature))
