"""Masked-LM cross-entropy over the tied decoder, with top-1 accuracy, never holding ``[M, V]`` float32 logits.

Owns the per-row Triton kernel, the host loop and the autograd.Function. The host takes the masked rows in blocks
of at most ``CHUNK_ELEMENTS // V`` rows; for each block the logits ``h @ W.T + b`` come from one matmul (cuBLAS
in the input dtype with the bias in its epilogue, so the tensor cores do the FLOPs) and the kernel walks each
row's vocabulary in ``BLOCK_V`` chunks twice: first an online log-sum-exp with the target logit and the running
argmax, then the gradient of the mean loss, ``(softmax - onehot) / labelled_rows``, written over the logits in
place. Two more matmuls turn that block into ``d_hidden`` and ``d_weight``; ``d_bias`` is its column sum. So the
forward does all the work (three matmuls, no recomputation) and the backward only scales the saved gradients by
the incoming ``grad_loss``.

Where it stops being good: the logits round-trip through memory once per pass (a matmul-fused kernel would keep
them on chip, at the price of writing its own GEMM); bf16 logits carry bf16 rounding, as any bf16 matmul's output
does; ``d_weight`` accumulates over row blocks in the weight's dtype, like the torch reference. Labels must be in
``[0, V)`` or ``-100``; others are not checked (checking would cost a device sync) and give a garbage loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, TYPE_NAMES, aot_spec, dedupe
from ._common import empty as _empty
from .downcast import to_output

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits elements per block of rows
BLOCK_V = 1024
NUM_WARPS = 4


@triton.jit
def _mlm_loss_rows(
    Logits,
    Labels,
    InvDenom,
    Loss,
    Correct,
    vocab,
    stride_l,
    IGNORE_INDEX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
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
    target = tl.zeros((BLOCK_V,), dtype=tl.float32)
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
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    top = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == top, best_index, vocab), axis=0)
    valid = label != IGNORE_INDEX
    tl.store(Loss + row, tl.where(valid, lse - tl.sum(target, axis=0), 0.0))
    tl.store(Correct + row, tl.where(valid & (argmax == label), 1.0, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(InvDenom), 0.0)
        for start in range(0, vocab, BLOCK_V):
            col = start + lanes
            ok = col < vocab
            z = tl.load(logits + col, mask=ok, other=0.0).to(tl.float32)
            grad = (tl.exp(z - lse) - tl.where(col == label, 1.0, 0.0)) * scale
            tl.store(logits + col, to_output(grad, Logits.dtype.element_ty), mask=ok)


def launch_meta(dtype: torch.dtype, write_grad: bool) -> dict[str, object]:
    """Every constexpr and launch option of the row kernel for ``dtype`` logits, as ``forward`` passes it and
    ``aot_specs`` compiles it: ``write_grad`` when some input wants a gradient (the logits are then overwritten)."""
    if dtype not in DTYPES:
        raise ValueError(f"mlm_loss: dtype {dtype} is not one of {DTYPES}")
    return {"IGNORE_INDEX": IGNORE_INDEX, "WRITE_GRAD": write_grad, "BLOCK_V": BLOCK_V, "num_warps": NUM_WARPS}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _empty(shape, dtype, device).zero_()


def forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, want: tuple[bool, bool, bool]
):
    """``(loss, accuracy, d_hidden, d_weight, d_bias)``, the gradients (of the mean loss) only where ``want``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"mlm_loss: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [M, E] and [V, E]"
        )
    rows, vocab = hidden.shape[0], weight.shape[0]
    if bias.shape != (vocab,) or labels.shape != (rows,):
        raise ValueError(
            f"mlm_loss: bias {tuple(bias.shape)} must be ({vocab},) and labels {tuple(labels.shape)} must be ({rows},)"
        )
    device, dtype = hidden.device, hidden.dtype
    hidden, weight, bias, labels = hidden.contiguous(), weight.contiguous(), bias.contiguous(), labels.contiguous()
    meta = launch_meta(dtype, write_grad=any(want))
    labelled = (labels != IGNORE_INDEX).sum()
    inv_denom = labelled.clamp(min=1).float().reciprocal().reshape(1)
    loss_rows = _empty((rows,), torch.float32, device)
    correct_rows = _empty((rows,), torch.float32, device)
    d_hidden = _empty((rows, hidden.shape[1]), dtype, device) if want[0] else None
    d_weight = _zeros(tuple(weight.shape), weight.dtype, device) if want[1] else None
    d_bias = _zeros((vocab,), torch.float32, device) if want[2] else None
    block = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        h = hidden[start:stop]
        logits = _empty((stop - start, vocab), dtype, device)
        torch.addmm(bias, h, weight.t(), out=logits)
        _mlm_loss_rows[(stop - start,)](
            logits,
            labels[start:stop],
            inv_denom,
            loss_rows[start:stop],
            correct_rows[start:stop],
            vocab,
            logits.stride(0),
            **meta,
        )
        if d_hidden is not None:
            torch.mm(logits, weight, out=d_hidden[start:stop])
        if d_weight is not None:
            d_weight.addmm_(logits.t(), h)
        if d_bias is not None:
            d_bias += logits.sum(dim=0, dtype=torch.float32)
    loss = loss_rows.sum() * inv_denom[0]
    accuracy = correct_rows.sum() * inv_denom[0]
    return loss, accuracy, d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition the kernel is tested against: full logits, cross-entropy and argmax, in ``hidden``'s dtype
    for the matmul and float32 for the rest."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    valid = labels != IGNORE_INDEX
    denom = valid.sum().clamp(min=1).float()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / denom
    accuracy = ((logits.argmax(dim=1) == labels) & valid).sum().float() / denom
    return loss, accuracy


class MLMLoss(torch.autograd.Function):
    """The gradients are computed in the forward and handed over once: they are kept as a ctx attribute, not saved
    tensors, and scaled in place, so autograd can take them as the ``.grad`` without copying ``d_weight``
    (``V x E``, the largest tensor here). A second backward through the same graph is refused."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        loss, accuracy, *grads = forward(hidden, weight, bias, labels, tuple(ctx.needs_input_grad[:3]))
        ctx.grads = grads
        ctx.mark_non_differentiable(accuracy)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_accuracy):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "mlm_loss: backward ran twice through the same graph; its gradients are computed in "
                "the forward and handed over once (retain_graph=True is not supported)"
            )
        return (*(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None)


def mlm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled rows (``-100`` ignored) and the detached top-1 accuracy.

    hidden ``[M, E]`` (the transformed states at masked positions), weight ``[V, E]``, bias ``[V]``, labels
    ``[M]``. Zero labelled rows give a loss of 0 with zero gradients.
    """
    return MLMLoss.apply(hidden, weight, bias, labels)


def aot_specs() -> list[dict]:
    """The one tile configuration, for each logits dtype, with and without the gradient pass, for the
    ahead-of-time compile test."""
    types = {"Labels": "*i64", "InvDenom": "*fp32", "Loss": "*fp32", "Correct": "*fp32", "vocab": "i32"}
    types["stride_l"] = "i32"
    specs = []
    for dtype in DTYPES:
        for write_grad in (False, True):
            meta = launch_meta(dtype, write_grad)
            config = {"dtype": TYPE_NAMES[dtype], "WRITE_GRAD": write_grad, "BLOCK_V": BLOCK_V}
            logits = {"Logits": f"*{TYPE_NAMES[dtype]}", **types}
            specs.append(aot_spec(_mlm_loss_rows, config, meta, logits, ("vocab", "stride_l"), unaligned_too=True))
    return dedupe(specs)
