"""mlm_loss loss, accuracy and every gradient against the fp32 full-logits reference, on guarded buffers."""

from __future__ import annotations

import math

import pytest
import torch
from fastbert.kernels import mlm_loss as kernel
from kernel_checks import GuardedBuffers, assert_close

from fastbert import ops


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


def _run(fn, inputs, dtype, grad_loss, place):
    hidden, weight, bias, labels = inputs
    leaves = [place(t.to(dtype), requires_grad=True) for t in (hidden, weight, bias)]
    loss, accuracy = fn(*leaves, place(labels))
    (loss * grad_loss).backward()
    return loss, accuracy, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "vocab", "width", "block_rows", "ignored"), [
    (1, 1000, 64, None, 0.0),     # M = 1, vocab below one BLOCK_V
    (37, 3001, 96, 10, 0.3),      # rows not a multiple of the row block; vocab not a multiple of BLOCK_V
    (20, 2048, 384, 7, 0.0),      # vocab an exact multiple of BLOCK_V
    (9, 1500, 32, None, 1.0),     # no labelled row: loss 0, zero gradients
])
def test_mlm_loss_matches_reference(rows, vocab, width, block_rows, ignored, dtype, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    if block_rows is not None:
        monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", block_rows * vocab + vocab // 2)
    inputs = _inputs(rows, vocab, width, dtype, ignored, seed=rows)
    grad_loss = 1.7

    def clone(t, requires_grad=False):
        return t.clone().requires_grad_(requires_grad)

    ref = _run(kernel.reference, inputs, torch.float32, grad_loss, clone)
    low = _run(kernel.reference, inputs, dtype, grad_loss, clone)
    got = _run(kernel.mlm_loss, inputs, dtype, grad_loss, guard.place)
    guard.check()

    assert got[0].dtype == torch.float32
    assert_close("loss", got[0], ref[0], low[0].to(torch.float32), ulps=64)
    if ignored < 1.0:
        assert ref[1].item() > 0.2, "the test should have rows the model gets right"
    if dtype == torch.float32:
        assert got[1].item() == pytest.approx(ref[1].item(), abs=1e-6), "accuracy"
    else:  # near-ties of the top two logits may flip in low precision: allow one row either way
        assert abs(got[1].item() - ref[1].item()) <= 1 / rows + 1e-6, f"accuracy {got[1]} vs {ref[1]}"
    # Each gradient is a sum over K terms (vocab for d_hidden, rows for the others) in another order than torch's;
    # in fp32 every softmax term also carries the rounding of the log-sum-exp, whose magnitude is about log V.
    lse_scale = math.log(vocab) if dtype == torch.float32 else 1.0
    for name, g, r, lo, terms in zip(("d_hidden", "d_weight", "d_bias"), got[2], ref[2], low[2], (vocab, rows, rows),
                                     strict=True):
        assert_close(name, g, r, lo, ulps=(8 + terms**0.5) * lse_scale)
    if ignored == 1.0:
        assert got[0].item() == 0.0 and all(bool((g == 0).all()) for g in got[2])
    else:
        assert got[0].item() > 0.5


def test_no_float32_logits_for_every_row(monkeypatch):
    sizes = []
    original = kernel._empty
    monkeypatch.setattr(kernel, "_empty", lambda shape, *a: sizes.append(tuple(shape)) or original(shape, *a))
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 8 * 1000)
    hidden, weight, bias, labels = _inputs(40, 1000, 32, torch.float32, 0.0, seed=1)
    kernel.mlm_loss(hidden.requires_grad_(), weight, bias, labels)
    assert max(s[0] for s in sizes if len(s) == 2 and s[1] == 1000) <= 8


def test_ops_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    hidden, weight, bias, labels = _inputs(5, 1100, 32, torch.float32, 0.2, seed=2)
    loss, accuracy = ops.mlm_loss(hidden, weight, bias, labels)
    ref_loss, ref_accuracy = ops._ChunkedMLMLoss.apply(hidden, weight, bias, labels)
    assert_close("loss", loss, ref_loss, ref_loss, ulps=64)
    assert accuracy.item() == ref_accuracy.item()


def test_backward_twice_is_refused():
    hidden, weight, bias, labels = _inputs(3, 1100, 32, torch.float32, 0.0, seed=4)
    loss, _ = kernel.mlm_loss(hidden.requires_grad_(), weight, bias, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
