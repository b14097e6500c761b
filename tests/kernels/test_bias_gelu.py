"""bias_gelu forward and backward against the float64 reference, on guarded buffers; ops dispatch."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from kernel_checks import (
    DEVICE,
    Comparison,
    GuardedBuffers,
    compare,
    forbid,
    host,
    patched,
    same_arguments,
    spy,
    to_device,
)

from fastbert import ops
from fastbert.kernels import bias_gelu as kernel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 384), (100, 1000), (3, 43, 129), (37, 4096), (5, 7)]


@functools.cache
def comparisons(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Comparison]:
    """The kernel run once on guarded buffers, each output against float64 from the same rounded inputs (cached:
    test_mutations.py reuses it).

    Per element the kernel adds few terms: ``y = z/2 + z erf(z/√2)/2`` (at most ``|z|`` in size) and ``dx = dy (cdf + z
    pdf)``, whose float32 error is about ``|dy| (1 + |z| pdf (1 + z²))`` ulps of float32 (``1 + erf`` cancels, the
    exponent of pdf carries ``z²/2``); ``dbias`` sums the float32 ``dx`` (not the rounded one) over rows."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    bias = torch.randn(shape[-1], generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)

    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        xf, bf = guard.place(x, requires_grad=True), guard.place(bias, requires_grad=True)
        y = kernel.bias_gelu(xf, bf)
        y.backward(guard.place(dy))
    guard.check()
    assert y.dtype == dtype and xf.grad.dtype == dtype and bf.grad.dtype == dtype

    x64, b64 = x.double().requires_grad_(), bias.double().requires_grad_()
    y64 = kernel.reference(x64, b64)
    y64.backward(dy.double())
    z = (x64 + b64).detach()
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    dx_terms = dy.double().abs() * (1 + z.abs() * pdf * (1 + z * z))
    rows = x.numel() // shape[-1]
    return {
        "y": compare("y", y, y64, sum_abs=z.abs(), ops=8),
        "dx": compare("dx", xf.grad, x64.grad, sum_abs=dx_terms, ops=16),
        "dbias": compare("dbias", bf.grad, b64.grad, sum_abs=dx_terms.reshape(rows, -1).sum(0), ops=rows + 16),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_reference(shape, dtype):
    for comparison in comparisons(shape, dtype).values():
        comparison.check()


def test_ops_dispatches_to_the_kernel(monkeypatch):
    x, bias = torch.randn(4, 8), torch.randn(8)
    want = kernel.reference(x, bias)
    dx, dbias = to_device(x), to_device(bias)  # where the kernel runs: the CPU only when interpreted
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    calls = spy(monkeypatch, kernel, "bias_gelu")
    with monkeypatch.context() as m:
        forbid(m, ops.F, "gelu", "ops.bias_gelu fell back to the torch reference")
        y = ops.bias_gelu(dx, dbias)
        if DEVICE.type == "cuda":  # auto: CUDA tensors take the kernel
            monkeypatch.setenv("FASTBERT_BACKEND", "auto")
            ops.bias_gelu(dx, dbias)
            monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    kernel_calls = 1 + (DEVICE.type == "cuda")
    assert len(calls) == kernel_calls and all(same_arguments(args, (dx, dbias)) for args, _ in calls)
    torch.testing.assert_close(host(y), want)
    # The tanh approximation has no kernel: it takes the reference even when Triton is forced.
    ops.bias_gelu(dx, dbias, approximate="tanh")
    assert len(calls) == kernel_calls
    for backend in ("torch", "auto"):  # auto: CPU tensors take the reference
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        forbid(monkeypatch, kernel, "bias_gelu", f"FASTBERT_BACKEND={backend} used the kernel")
        torch.testing.assert_close(ops.bias_gelu(x, bias), want)
