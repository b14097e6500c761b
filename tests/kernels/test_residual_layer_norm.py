"""residual_layer_norm forward and every gradient against the float64 reference on guarded buffers; dropout masks;
ops dispatch."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    DEVICE,
    Comparison,
    GuardedBuffers,
    assert_close,
    compare,
    forbid,
    host,
    patched,
    same_arguments,
    spy,
    to_device,
)

from fastbert import ops
from fastbert.kernels import residual_layer_norm as kernel

EPS = 1e-12  # BERT's


def _inputs(shape, dtype, seed):
    """x, residual, weight, bias, x_bias, and upstream grads for both outputs; rounded to ``dtype`` once."""
    g = torch.Generator().manual_seed(seed)
    cols = shape[-1]

    def make(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(dtype).float()

    return {
        "x": make(*shape, scale=2.0, shift=0.5),
        "residual": make(*shape),
        "weight": make(cols, shift=1.0),
        "bias": make(cols, scale=0.1),
        "x_bias": make(cols, scale=0.1),
        "dy": make(*shape),
        "dsum": make(*shape),
    }


def _run(fn, t, dtype, use_residual, use_x_bias, use_dsum, place=None):
    place = place or (lambda tensor, requires_grad=False: tensor.clone().requires_grad_(requires_grad))
    leaves = {k: place(t[k].to(dtype), requires_grad=True) for k in ("x", "residual", "weight", "bias", "x_bias")}
    y, summed = fn(
        leaves["x"],
        leaves["residual"] if use_residual else None,
        leaves["weight"],
        leaves["bias"],
        leaves["x_bias"] if use_x_bias else None,
    )
    loss = (y.float() * place(t["dy"].to(dtype)).float()).sum()
    if use_dsum:
        loss = loss + (summed.float() * place(t["dsum"].to(dtype)).float()).sum()
    loss.backward()
    return y, summed, leaves


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # shape, use_residual, use_x_bias, use_dsum
    ((1, 384), True, True, False),
    ((100, 1000), True, True, True),
    ((3, 43, 384), False, False, False),
    ((129, 384), True, False, True),
    ((5, 4096), False, True, False),
    ((2, 7), True, True, True),
    ((4, 384), False, False, True),  # summed is x itself, and its gradient still flows
]


def _reference(t, dtype, use_residual, use_x_bias, use_dsum):
    """float64 forward and backward from the rounded inputs. The kernel normalizes the sum it stores, rounded to
    ``dtype``, so the reference does too (straight through: the rounding has gradient 1)."""
    leaves = {k: t[k].double().requires_grad_() for k in ("x", "residual", "weight", "bias", "x_bias")}
    exact = leaves["x"] + (leaves["x_bias"] if use_x_bias else 0) + (leaves["residual"] if use_residual else 0)
    stored = exact
    if use_residual or use_x_bias:
        stored = exact + (exact.detach().to(dtype).double() - exact.detach())
    y = F.layer_norm(stored, (stored.shape[-1],), leaves["weight"], leaves["bias"], EPS)
    loss = (y * t["dy"].double()).sum()
    if use_dsum:
        loss = loss + (stored * t["dsum"].double()).sum()
    loss.backward()
    return y, exact, stored.detach(), leaves


@functools.cache
def comparisons(case: tuple, dtype: torch.dtype) -> dict[str, Comparison]:
    """The kernel run once on guarded buffers, each output against float64 (cached: test_mutations.py reuses it).

    The float32 error of each output is counted in ulps of the magnitudes it is made of: ``A = |x| + |x_bias| +
    |residual|`` for the sum; ``H = |xhat| + rstd (A + mean A)`` for the normalized value and its error (the mean and
    variance are row sums of ``cols`` terms, and in float32 the sum itself is off by ulps of A); the gradient of the
    sum adds ``rstd (|w dy| + H mean(H |w dy|) + mean|w dy|) + |dsum|``; the parameter gradients sum those over rows
    (``dx_bias`` sums the float32 ``ds``, not the rounded one)."""
    shape, *flags = case
    use_residual, use_x_bias, use_dsum = flags
    t = {k: v.to(dtype) for k, v in _inputs(shape, dtype, seed=shape[-1]).items()}
    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        y, s, got = _run(
            lambda x, r, w, b, xb: kernel.residual_layer_norm(x, r, w, b, EPS, xb, 0.1, training=False),
            t,
            dtype,
            *flags,
            place=guard.place,
        )
    guard.check()
    assert y.dtype == s.dtype == dtype
    if not use_residual:
        assert got["residual"].grad is None
    if not use_x_bias:
        assert got["x_bias"].grad is None

    y_ref, s_ref, stored, ref = _reference(t, dtype, *flags)
    cols = shape[-1]
    rows = y.numel() // cols
    parts = t["x"].double().abs() + (t["x_bias"].double().abs() if use_x_bias else 0)
    parts = (parts + (t["residual"].double().abs() if use_residual else 0)).reshape(rows, cols)
    stored = stored.reshape(rows, cols)
    rstd = (stored.var(dim=1, unbiased=False, keepdim=True) + EPS).rsqrt()
    xhat = (stored - stored.mean(dim=1, keepdim=True)) * rstd
    h = xhat.abs() + rstd * (parts + parts.mean(dim=1, keepdim=True))
    dy = t["dy"].double().abs().reshape(rows, cols)
    wdy = t["weight"].double().abs() * dy
    ds = rstd * (wdy + h * (h * wdy).mean(dim=1, keepdim=True) + wdy.mean(dim=1, keepdim=True))
    if use_dsum:
        ds = ds + t["dsum"].double().abs().reshape(rows, cols)
    out = {
        "normalized": compare(
            "normalized",
            y,
            y_ref,
            sum_abs=(t["weight"].double().abs() * h + t["bias"].double().abs()).view(shape),
            ops=cols + 16,
        ),
        "summed": compare("summed", s, s_ref, sum_abs=parts.view(shape), ops=2),
        "dx": compare("dx", got["x"].grad, ref["x"].grad, sum_abs=ds.view(shape), ops=cols + 16),
        "dweight": compare(
            "dweight", got["weight"].grad, ref["weight"].grad, sum_abs=(dy * h).sum(0), ops=rows + cols + 16
        ),
        "dbias": compare("dbias", got["bias"].grad, ref["bias"].grad, sum_abs=dy.sum(0), ops=rows + 2),
    }
    if use_residual:
        out["dresidual"] = compare(
            "dresidual", got["residual"].grad, ref["residual"].grad, sum_abs=ds.view(shape), ops=cols + 16
        )
    if use_x_bias:
        out["dx_bias"] = compare(
            "dx_bias", got["x_bias"].grad, ref["x_bias"].grad, sum_abs=ds.sum(0), ops=rows + cols + 16
        )
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)).replace(" ", ""))
def test_residual_layer_norm_matches_reference(case, dtype):
    for comparison in comparisons(case, dtype).values():
        comparison.check()


def test_dropout_mask_is_reproducible_and_regenerated_in_backward(monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    p = 0.25
    t = _inputs((50, 384), torch.float32, seed=3)

    def fused(x, r, w, b, xb, seed=1234):
        return kernel.residual_layer_norm(x, r, w, b, EPS, xb, p, training=True, seed=seed)

    y, summed, got = _run(fused, t, torch.float32, True, True, True, place=guard.place)
    guard.check()
    keep = (host(summed) - t["residual"]).ne(0).float()  # a dropped element leaves exactly the residual
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
    dx = host(got["x"].grad)
    assert torch.equal(dx[keep == 0], torch.zeros_like(dx[keep == 0]))

    again, _, _ = _run(fused, t, torch.float32, True, True, True, place=to_device)
    other, _, _ = _run(lambda *a: fused(*a, seed=99), t, torch.float32, True, True, True, place=to_device)
    assert torch.equal(again, y), "the same seed must give the same mask"
    assert not torch.equal(other, y), "a different seed must give a different mask"


def test_no_dropout_outside_training():
    t = {k: to_device(v) for k, v in _inputs((4, 128), torch.float32, seed=5).items()}
    y, summed = kernel.residual_layer_norm(
        t["x"], t["residual"], t["weight"], t["bias"], EPS, None, 0.5, training=False
    )
    assert torch.equal(summed, t["x"] + t["residual"])


def test_rows_wider_than_the_tile_are_rejected():
    with pytest.raises(ValueError, match="4097"):
        kernel.config(4097)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    t = _inputs((3, 128), torch.float32, seed=9)
    args = (t["x"], t["residual"], t["weight"], t["bias"], EPS, t["x_bias"], 0.25, True)
    y_ref, _ = kernel.reference(t["x"], t["residual"], t["weight"], t["bias"], EPS, t["x_bias"])
    on_device = tuple(to_device(a) if torch.is_tensor(a) else a for a in args)  # the CPU only when interpreted
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    calls = spy(monkeypatch, kernel, "residual_layer_norm")
    with monkeypatch.context() as m:
        forbid(m, ops.F, "layer_norm", "ops.residual_layer_norm fell back to the torch reference")
        ops.residual_layer_norm(*on_device)  # every argument, dropout included, reaches the kernel
        y, summed = ops.residual_layer_norm(*on_device[:6])
        if DEVICE.type == "cuda":  # auto: CUDA tensors take the kernel
            monkeypatch.setenv("FASTBERT_BACKEND", "auto")
            ops.residual_layer_norm(*on_device[:6])
    assert len(calls) == 2 + (DEVICE.type == "cuda") and same_arguments(calls[0][0], on_device)
    assert all(same_arguments(args, (*on_device[:6], 0.0, False)) for args, _ in calls[1:])
    assert_close("normalized", y, y_ref, y_ref)
    for backend in ("torch", "auto"):  # auto: CPU tensors take the reference
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        forbid(monkeypatch, kernel, "residual_layer_norm", f"FASTBERT_BACKEND={backend} used the kernel")
        y, _ = ops.residual_layer_norm(*args[:6])
        torch.testing.assert_close(y, y_ref)
