"""The MLM loss through the Triton row kernel (``ops.mlm_loss`` and ``ops.mlm_loss_and_sample`` under
``FASTBERT_BACKEND=triton``): loss, accuracy and every gradient against the float64 full-logits reference, the
Gumbel-max draws against the reference's, every buffer the kernel touches guarded; ops dispatch."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
from kernel_checks import (
    DEVICE,
    Comparison,
    GuardedBuffers,
    assert_close,
    compare,
    forbid,
    host,
    patched,
    rounded_magnitude,
    spy,
    to_device,
)

from fastbert import ops
from fastbert.kernels import mlm_loss as kernel


def _inputs(rows, vocab, width, dtype, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, width, generator=g)).to(dtype).float()
    weight = (torch.randn(vocab, width, generator=g) * width**-0.5 * 3).to(dtype).float()
    bias = (torch.randn(vocab, generator=g) * 0.5).to(dtype).float()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    # Half the rows labelled with their top logit, so that accuracy is far from 0 and an off-by-one shows.
    top = torch.nn.functional.linear(hidden, weight, bias).argmax(dim=1)
    labels = torch.where(torch.rand(rows, generator=g) < 0.5, top, labels)
    labels[torch.rand(rows, generator=g) < ignored] = kernel.IGNORE_INDEX
    return hidden, weight, bias, labels


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # rows, vocab, width, rows per block (None: the default, one block), fraction of ignored rows
    (1, 1000, 64, None, 0.0),  # M = 1, vocab below one BLOCK_V
    (37, 3001, 96, 10, 0.3),  # 10 rows fit a block, cut to 8 (aligned): 37 not a multiple; vocab not of BLOCK_V
    (20, 2048, 384, 12, 0.0),  # vocab an exact multiple of BLOCK_V
    (9, 1500, 32, None, 1.0),  # no labelled row: loss 0, zero gradients
]
GRAD_LOSS = 1.7


KEYS_SEED = 11


def row_keys(rows: int, seed: int = KEYS_SEED) -> torch.Tensor:
    """Distinct int64 keys over the whole signed range, as SplitMix64 gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g, dtype=torch.int64)


@contextlib.contextmanager
def triton_backend():
    """``FASTBERT_BACKEND=triton`` for code that runs outside a single test (a cached case): restored on exit."""
    saved = os.environ.get("FASTBERT_BACKEND")
    os.environ["FASTBERT_BACKEND"] = "triton"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FASTBERT_BACKEND"]
        else:
            os.environ["FASTBERT_BACKEND"] = saved


class _GuardingSpy:
    """Stands in for the row kernel ``kernel._mlm_loss_rows``: runs it on copies of its tensors placed in guarded
    buffers (its outputs start as NaN or the integer sentinel), copies what it wrote back, checks that it left its
    inputs alone, and keeps a copy of each block of logits it was given (the kernel overwrites them with the
    gradient), so that the reference starts from the very same rounded logits."""

    def __init__(self, jit_function, guard: GuardedBuffers):
        self.jit_function, self.guard, self.blocks = jit_function, guard, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.jit_function.arg_names)
            written = {"Logits", "Loss", "Correct", *(["Samples"] if kwargs["SAMPLE"] else [])}
            self.blocks.append(args[0].detach().clone())
            placed = []
            for name, arg in zip(names, args, strict=False):
                if not torch.is_tensor(arg):
                    placed.append(arg)
                elif name in written and name != "Logits":
                    placed.append(self.guard.empty(tuple(arg.shape), arg.dtype, arg.device))
                else:
                    placed.append(self.guard.place(arg))
            self.jit_function[grid](*placed, **kwargs)
            for name, arg, copy in zip(names, args, placed, strict=False):
                if not torch.is_tensor(arg):
                    continue
                if name in written:
                    arg.copy_(copy)
                else:
                    assert torch.equal(copy, arg), f"the row kernel wrote its input {name}"

        return launch


@functools.cache
def comparisons(case: tuple, dtype: torch.dtype, sample: bool = False) -> dict[str, Comparison]:
    """The kernel run once on guarded buffers (cached: test_mutations.py reuses it), through ``ops.mlm_loss`` or,
    with ``sample``, ``ops.mlm_loss_and_sample``. The logits come from torch's matmul in the input dtype and are
    checked against float64 on their own; the loss and the gradients are checked against float64 from those same
    logits, and the draws must be the reference's draws from them, exactly.

    The row kernel's float32 gradient ``g = (softmax - onehot) / labelled`` is off by ulps of ``G = (p (1 + |z| +
    |lse|) + onehot) / labelled`` and is rounded to the input dtype before the matmuls that turn it into
    ``d_hidden = g W`` and ``d_weight = gᵀ h`` (operand rounding) and the float32 column sum ``d_bias``. The
    backward scales the saved gradients by ``grad_loss`` in their own dtype: ``grad_loss`` rounded, and the
    result rounded twice. ``d_weight`` also accumulates over row blocks in its dtype, rounding each partial sum."""
    rows, vocab, width, block_rows, ignored = case
    hidden, weight, bias, labels = (
        t.to(dtype) if t.is_floating_point() else t for t in _inputs(rows, vocab, width, dtype, ignored, seed=rows)
    )
    keys = row_keys(rows)
    guard = GuardedBuffers()
    row_kernel = _GuardingSpy(kernel._mlm_loss_rows, guard)
    chunk = kernel.CHUNK_ELEMENTS if block_rows is None else block_rows * vocab + vocab // 2
    with triton_backend(), patched(kernel, CHUNK_ELEMENTS=chunk, _mlm_loss_rows=row_kernel):
        leaves = [guard.place(t, requires_grad=True) for t in (hidden, weight, bias)]
        if sample:
            loss, accuracy, samples = ops.mlm_loss_and_sample(*leaves, guard.place(labels), guard.place(keys))
            assert samples.dtype == torch.int64 and not samples.requires_grad
        else:
            loss, accuracy = ops.mlm_loss(*leaves, guard.place(labels))
        (loss * GRAD_LOSS).backward()
    guard.check()
    assert loss.dtype == torch.float32
    assert all(leaf.grad.dtype == dtype for leaf in leaves)
    block = chunk // vocab - chunk // vocab % 4  # rounded down to 4 rows: 16-byte aligned float32 row outputs
    assert [b.shape[0] for b in row_kernel.blocks] == [min(block, rows - s) for s in range(0, rows, block)]

    h, w, b = hidden.double(), weight.double(), bias.double()
    z = host(torch.cat(row_kernel.blocks)).double()
    valid = labels != kernel.IGNORE_INDEX
    labelled = max(int(valid.sum()), 1)
    safe = torch.where(valid, labels, 0)
    lse = z.logsumexp(dim=1)
    p = (z - lse[:, None]).exp()
    onehot = torch.nn.functional.one_hot(safe, vocab).double()
    keep = valid.double()[:, None] / labelled
    g = (p - onehot) * keep
    g_error = (p * (1 + z.abs() + lse.abs()[:, None]) + onehot) * keep
    target = z.gather(1, safe[:, None]).squeeze(1)

    if sample:  # the same logits and the same noise: not one draw may differ
        noise = ops.gumbel_noise(keys, torch.arange(vocab)).double()
        drawn = (z + noise).argmax(dim=1)
        mismatched = (host(samples) != drawn).nonzero().flatten().tolist()
        assert not mismatched, f"draws differ from the reference's in rows {mismatched[:8]}"
    correct = ((z.argmax(dim=1) == labels) & valid).sum().item()  # the same logits: not one row may differ
    assert accuracy.item() == pytest.approx(correct / labelled, rel=1e-6), "accuracy"
    if ignored < 1.0:
        assert accuracy.item() > 0.2, "the test should have rows the model gets right"
        assert loss.item() > 0.5
    else:
        assert loss.item() == 0.0 and all(bool((leaf.grad == 0).all()) for leaf in leaves)
    g2 = rounded_magnitude(g, dtype).square()
    partial, partials = torch.zeros_like(w), []
    for start in range(0, rows - block, block):  # every partial sum but the last is rounded on its own
        partial = partial + GRAD_LOSS * g[start : start + block].T @ h[start : start + block]
        partials.append(partial)
    chain = vocab + rows + 16  # float32 operations along the longest sum
    grads = {
        "d_hidden": (leaves[0].grad, g @ w, g_error @ w.abs(), (g2 @ w.square()).sqrt(), []),
        "d_weight": (leaves[1].grad, g.T @ h, g_error.T @ h.abs(), (g2.T @ h.square()).sqrt(), partials),
        "d_bias": (leaves[2].grad, g.sum(0), g_error.sum(0), g2.sum(0).sqrt(), []),
    }
    out = {
        "logits": compare("logits", z.to(dtype), h @ w.T + b, sum_abs=h.abs() @ w.abs().T + b.abs(), ops=width + 2),
        "loss": compare(
            "loss",
            loss,
            ((lse - target) * valid).sum() / labelled,
            sum_abs=((lse.abs() + target.abs() + 1) * valid).sum() / labelled,
            ops=chain,
        ),
    }
    for name, (fused, ref, sum_abs, operand_l2, partials) in grads.items():
        ref = GRAD_LOSS * ref
        out[name] = compare(
            name,
            fused,
            ref,
            rounded=[ref, ref, *partials],
            sum_abs=GRAD_LOSS * sum_abs,
            ops=chain,
            operand_l2=GRAD_LOSS * operand_l2,
        )
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_mlm_loss_matches_reference(case, dtype):
    for comparison in comparisons(case, dtype).values():
        comparison.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_mlm_loss_and_sample_matches_reference(case, dtype):
    """The same checks with the draw on, and the draws equal to the reference's (inside ``comparisons``)."""
    for comparison in comparisons(case, dtype, sample=True).values():
        comparison.check()


def test_no_logits_for_every_row(monkeypatch):
    blocks = []
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 8 * 1000)
    real = kernel.loss_rows
    monkeypatch.setattr(kernel, "loss_rows", lambda logits, *a: blocks.append(logits.shape) or real(logits, *a))
    hidden, weight, bias, labels = (to_device(t) for t in _inputs(40, 1000, 32, torch.float32, 0.0, seed=1))
    ops.mlm_loss(hidden.requires_grad_(), weight, bias, labels)
    assert blocks == [(8, 1000)] * 5


def test_ops_dispatches_to_the_kernel(monkeypatch):
    hidden, weight, bias, labels = _inputs(5, 1100, 32, torch.float32, 0.2, seed=2)
    keys = row_keys(5)
    ref_loss, ref_accuracy, ref_samples = ops.mlm_loss_and_sample(hidden, weight, bias, labels, keys)
    on_device = tuple(to_device(t) for t in (hidden, weight, bias, labels, keys))  # the CPU only when interpreted
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    calls = spy(monkeypatch, kernel, "loss_rows")
    with monkeypatch.context() as m:
        forbid(m, ops, "_mlm_rows_reference", "ops.mlm_loss fell back to the torch reference")
        loss, accuracy = ops.mlm_loss(*on_device[:4])
        _, _, samples = ops.mlm_loss_and_sample(*on_device)
        if DEVICE.type == "cuda":  # auto: CUDA tensors take the kernel
            monkeypatch.setenv("FASTBERT_BACKEND", "auto")
            ops.mlm_loss(*on_device[:4])
    assert len(calls) == 2 + (DEVICE.type == "cuda")
    for (args, _), keys_passed in zip(calls, (False, True, False), strict=False):  # one block of all five rows
        assert torch.equal(args[1], on_device[3])
        assert torch.equal(args[3], on_device[4]) if keys_passed else args[3] is None
    assert_close("loss", loss, ref_loss, ref_loss, ulps=64)
    assert accuracy.item() == ref_accuracy.item()
    assert torch.equal(host(samples), ref_samples)
    for backend in ("torch", "auto"):  # auto: CPU tensors take the reference
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        forbid(monkeypatch, kernel, "loss_rows", f"FASTBERT_BACKEND={backend} used the kernel")
        assert ops.mlm_loss(hidden, weight, bias, labels)[0].item() == ref_loss.item()


def test_backward_twice_is_refused(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    hidden, weight, bias, labels = (to_device(t) for t in _inputs(3, 1100, 32, torch.float32, 0.0, seed=4))
    loss, _ = ops.mlm_loss(hidden.requires_grad_(), weight, bias, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
