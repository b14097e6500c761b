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
import os
from functools import cache

import torch
import torch.nn.functional as F

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
    if setting == "torch":
        return None
    kernel = triton_kernel(op)
    if setting == "triton":
        if kernel is None:
            raise RuntimeError(f"FASTBERT_BACKEND=triton but the Triton kernel for {op!r} is not available")
        return kernel
    return kernel if tensor.is_cuda else None


# Attention ------------------------------------------------------------------------------------------------------
def varlen_token_index(cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """For each token of an unpadded batch, its row in the padded ``[B * max_seqlen]`` layout."""
    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    batch = torch.repeat_interleave(torch.arange(seqlens.numel(), device=cu_seqlens.device), seqlens)
    total = batch.numel()
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
    index = varlen_token_index(cu_seqlens, max_seqlen)

    def pad(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(batch * max_seqlen, heads, head_dim).index_copy(0, index, x)
        return padded.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

    seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
    # An empty sequence keeps its first key visible so that its (unused) row of the softmax is not 0/0.
    keep = torch.arange(max_seqlen, device=q.device)[None, :] < seqlens.clamp(min=1)[:, None]
    out = F.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], dropout_p=dropout_p, scale=softmax_scale)
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
    x = F.dropout(x, dropout_p, training)
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
IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 23  # logits elements per vocabulary chunk: 32 MiB of float32


def _vocab_chunk(rows: int, vocab: int) -> int:
    return max(1024, min(vocab, _CHUNK_ELEMENTS // max(rows, 1)))


class _ChunkedMLMLoss(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T + bias`` against labels, one vocabulary chunk at a time.

    Forward keeps an online log-sum-exp, the target logit and a running argmax; backward recomputes each chunk's
    logits from the saved log-sum-exp. Peak extra memory is one ``[M, chunk]`` block instead of ``[M, V]``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        rows, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        safe_labels = torch.where(valid, labels, 0)
        running_max = hidden.new_full((rows,), float("-inf"), dtype=torch.float32)
        running_sum = hidden.new_zeros((rows,), dtype=torch.float32)
        target = hidden.new_zeros((rows,), dtype=torch.float32)
        best = hidden.new_full((rows,), float("-inf"), dtype=torch.float32)
        best_index = torch.zeros(rows, dtype=torch.long, device=hidden.device)
        chunk = _vocab_chunk(rows, vocab)
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            logits = torch.addmm(bias[start:stop], hidden, weight[start:stop].t()).float()
            chunk_max, chunk_arg = logits.max(dim=1)
            new_max = torch.maximum(running_max, chunk_max)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max[:, None]).sum(dim=1)
            running_max = new_max
            improved = chunk_max > best
            best = torch.where(improved, chunk_max, best)
            best_index = torch.where(improved, chunk_arg + start, best_index)
            inside = (safe_labels >= start) & (safe_labels < stop)
            local = (safe_labels - start).clamp(0, stop - start - 1)
            target = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), target)
        lse = running_max + torch.log(running_sum)
        count = valid.sum()
        denom = count.clamp(min=1).float()
        loss = ((lse - target) * valid).sum() / denom
        correct = ((best_index == safe_labels) & valid).sum().float() / denom
        ctx.save_for_backward(hidden, weight, bias, safe_labels, valid, lse, denom)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, bias, labels, valid, lse, denom = ctx.saved_tensors
        rows, vocab = hidden.shape[0], weight.shape[0]
        scale = (grad_loss / denom) * valid.float()
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.empty_like(bias) if ctx.needs_input_grad[2] else None
        chunk = _vocab_chunk(rows, vocab)
        row_ids = torch.arange(rows, device=hidden.device)
        for start in range(0, vocab, chunk):
            stop = min(start + chunk, vocab)
            logits = torch.addmm(bias[start:stop], hidden, weight[start:stop].t()).float()
            grad = torch.exp(logits - lse[:, None])
            inside = (labels >= start) & (labels < stop)
            grad[row_ids[inside], labels[inside] - start] -= 1.0
            grad *= scale[:, None]
            grad_hidden.addmm_(grad, weight[start:stop].float())
            if grad_weight is not None:
                torch.mm(grad.to(hidden.dtype).t(), hidden, out=grad_weight[start:stop])
            if grad_bias is not None:
                grad_bias[start:stop] = grad.sum(dim=0)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias, None


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
