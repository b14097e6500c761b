"""The model's fused operations, one function each: ``attention``, ``residual_layer_norm``, ``bias_gelu``,
``mlm_loss``.

Each function takes plain tensors and picks an implementation: the Triton kernel from ``fastbert.kernels`` for CUDA
tensors when that kernel exists, the torch reference otherwise. ``FASTBERT_BACKEND=torch`` forces the reference;
``FASTBERT_BACKEND=triton`` forces the kernel (with ``TRITON_INTERPRET=1`` it then runs on CPU tensors) and is an
error for an op whose kernel is not there. The references here are the definitions the kernels are tested against,
and they are written to be fast on CPU: attention goes through SDPA, and ``mlm_loss`` walks the vocabulary in chunks
so that no ``[M, V]`` float32 logits tensor is kept for backward.
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
    q, k, v = pad(q), pad(k), pad(v)
    if dropout_p == 0.0:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=softmax_scale)
    else:  # SDPA's own dropout on CPU draws with bernoulli_, the slowest part of a training step
        scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        scores = scores.masked_fill_(~keep[:, None, None, :], float("-inf")).softmax(dim=-1)
        out = torch.matmul(dropout(scores, dropout_p), v)
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


# MLM loss -------------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 22  # logits elements per block of rows: 16 MiB of float32


class _ChunkedMLMLoss(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T + bias`` against labels, one block of rows at a time.

    A block holds few enough rows that its ``[rows, V]`` float32 logits stay under ``_CHUNK_ELEMENTS``; within a
    block the log-sum-exp is exact, so the gradient of the (linear in the loss) cross-entropy is computed in the
    same pass and kept for backward, which only scales it. That is three matmuls per block and no recomputation;
    no ``[M, V]`` tensor ever exists. (The Triton kernel walks the vocabulary instead; both give the same values.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        rows, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        safe_labels = torch.where(valid, labels, 0)
        compute = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for a float64 model
        denom = valid.sum().clamp(min=1).to(compute)
        want_grad = any(ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[2] else None
        loss = hidden.new_zeros((), dtype=compute)
        correct = hidden.new_zeros((), dtype=compute)
        block = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            h, y, keep = hidden[start:stop], safe_labels[start:stop], valid[start:stop]
            logits = torch.addmm(bias, h, weight.t()).to(compute)
            top, predicted = logits.max(dim=1)  # the first maximum, as argmax picks it
            target = logits.gather(1, y[:, None]).squeeze(1)
            # One exp pass serves both the log-sum-exp and the gradient: exp(logits - max), in place of the logits.
            exp = logits.sub_(top[:, None]).exp_()
            total = exp.sum(dim=1)
            loss += ((top + total.log() - target) * keep).sum()
            correct += ((predicted == y) & keep).sum()
            if not want_grad:
                continue
            weight_row = keep.to(compute) / denom
            grad = exp.mul_((weight_row / total)[:, None])  # softmax, scaled by each row's share of the mean
            grad[torch.arange(stop - start, device=grad.device), y] -= weight_row
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        # Kept as a plain attribute: save_for_backward would hold a second copy of the [V, E] weight gradient.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct)
        return loss / denom, correct / denom

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None)


def mlm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM cross-entropy from the transformed hidden states at masked positions.

    hidden ``[M, E]``, decoder weight ``[V, E]`` (tied to the word embeddings), bias ``[V]``, labels ``[M]``
    (``-100`` is ignored). Returns ``(mean loss over labelled rows, top-1 accuracy)``; the accuracy is detached.
    Zero labelled rows give a loss of 0 with zero gradients, not NaN.
    """
    kernel = _kernel_for("mlm_loss", hidden)
    if kernel is not None:
        return kernel.mlm_loss(hidden, weight, bias, labels)
    return _ChunkedMLMLoss.apply(hidden, weight, bias, labels)
