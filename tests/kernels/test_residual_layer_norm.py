"""residual_layer_norm forward and every gradient against the fp32 reference on guarded buffers; dropout masks."""

from __future__ import annotations

import pytest
import torch
from fastbert.kernels import residual_layer_norm as kernel
from kernel_checks import GuardedBuffers, assert_close

from fastbert import ops

EPS = 1e-12  # BERT's


def _inputs(shape, dtype, seed):
    """x, residual, weight, bias, x_bias, and upstream grads for both outputs; rounded to ``dtype`` once."""
    g = torch.Generator().manual_seed(seed)
    cols = shape[-1]

    def make(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dtype).float()

    return {"x": make(*shape, scale=2.0, shift=0.5), "residual": make(*shape), "weight": make(cols, shift=1.0),
            "bias": make(cols, scale=0.1), "x_bias": make(cols, scale=0.1), "dy": make(*shape), "dsum": make(*shape)}


def _run(fn, t, dtype, use_residual, use_x_bias, use_dsum, place=None):
    place = place or (lambda tensor, requires_grad=False: tensor.clone().requires_grad_(requires_grad))
    leaves = {k: place(t[k].to(dtype), requires_grad=True) for k in ("x", "residual", "weight", "bias", "x_bias")}
    y, summed = fn(leaves["x"], leaves["residual"] if use_residual else None, leaves["weight"], leaves["bias"],
                   leaves["x_bias"] if use_x_bias else None)
    loss = (y.float() * place(t["dy"].to(dtype)).float()).sum()
    if use_dsum:
        loss = loss + (summed.float() * place(t["dsum"].to(dtype)).float()).sum()
    loss.backward()
    return y, summed, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "use_residual", "use_x_bias", "use_dsum"), [
    ((1, 384), True, True, False),
    ((100, 1000), True, True, True),
    ((3, 43, 384), False, False, False),
    ((129, 384), True, False, True),
    ((5, 4096), False, True, False),
    ((2, 7), True, True, True),
    ((4, 384), False, False, True),  # summed is x itself, and its gradient still flows
])
def test_residual_layer_norm_matches_reference(shape, use_residual, use_x_bias, use_dsum, dtype, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    t = _inputs(shape, dtype, seed=shape[-1])
    flags = (use_residual, use_x_bias, use_dsum)

    def reference(x, r, w, b, xb):
        return kernel.reference(x, r, w, b, EPS, xb)

    def fused(x, r, w, b, xb):
        return kernel.residual_layer_norm(x, r, w, b, EPS, xb, 0.1, training=False)

    y_ref, s_ref, ref = _run(reference, t, torch.float32, *flags)
    y_low, s_low, low = _run(reference, t, dtype, *flags)
    y, s, got = _run(fused, t, dtype, *flags, place=guard.place)
    guard.check()

    rows = y.numel() // shape[-1]
    assert_close("normalized", y, y_ref, y_low)
    assert_close("summed", s, s_ref, s_low)
    names = ["x", "weight", "bias"] + ["residual"] * use_residual + ["x_bias"] * use_x_bias
    for name in names:
        reduced = name in ("weight", "bias", "x_bias")  # sums over rows, in a different order than torch's
        assert_close(f"d{name}", got[name].grad, ref[name].grad, low[name].grad, ulps=4 * rows if reduced else 16)
    if not use_residual:
        assert got["residual"].grad is None
    if not use_x_bias:
        assert got["x_bias"].grad is None


def test_dropout_mask_is_reproducible_and_regenerated_in_backward(monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    p = 0.25
    t = _inputs((50, 384), torch.float32, seed=3)

    def fused(x, r, w, b, xb, seed=1234):
        return kernel.residual_layer_norm(x, r, w, b, EPS, xb, p, training=True, seed=seed)

    y, summed, got = _run(fused, t, torch.float32, True, True, True, place=guard.place)
    guard.check()
    keep = (summed - t["residual"]).ne(0).float()  # a dropped element leaves exactly the residual
    dropped = 1 - keep.mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, f"dropped fraction {dropped} for p={p}"

    def reference(x, r, w, b, xb):
        return kernel.reference(x, r, w, b, EPS, xb, keep=keep, dropout_p=p)

    y_ref, s_ref, ref = _run(reference, t, torch.float32, True, True, True)
    assert_close("normalized", y, y_ref, y_ref)
    assert_close("summed", summed, s_ref, s_ref)
    for name in ("x", "residual", "weight", "bias"):
        assert_close(f"d{name}", got[name].grad, ref[name].grad, ref[name].grad, ulps=16)
    assert_close("dx_bias", got["x_bias"].grad, ref["x_bias"].grad, ref["x_bias"].grad, ulps=200)
    assert torch.equal(got["x"].grad[keep == 0], torch.zeros_like(got["x"].grad[keep == 0]))

    again, _, _ = _run(fused, t, torch.float32, True, True, True)
    other, _, _ = _run(lambda *a: fused(*a, seed=99), t, torch.float32, True, True, True)
    assert torch.equal(again, y), "the same seed must give the same mask"
    assert not torch.equal(other, y), "a different seed must give a different mask"


def test_no_dropout_outside_training():
    t = _inputs((4, 128), torch.float32, seed=5)
    y, summed = kernel.residual_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], EPS, None, 0.5,
                                           training=False)
    assert torch.equal(summed, t["x"] + t["residual"])


def test_rows_wider_than_the_tile_are_rejected():
    with pytest.raises(ValueError, match="4097"):
        kernel.config(4097)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    t = _inputs((3, 128), torch.float32, seed=9)
    y, summed = ops.residual_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], EPS)
    y_ref, _ = kernel.reference(t["x"], t["residual"], t["weight"], t["bias"], EPS)
    assert_close("normalized", y, y_ref, y_ref)
    monkeypatch.setattr(kernel.ResidualLayerNorm, "apply", lambda *a: pytest.fail("kernel used with torch backend"))
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    ops.residual_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], EPS)
