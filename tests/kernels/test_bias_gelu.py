"""bias_gelu forward and backward against the fp32 reference, on guarded buffers."""

from __future__ import annotations

import pytest
import torch
from fastbert.kernels import bias_gelu as kernel
from kernel_checks import GuardedBuffers, assert_close

from fastbert import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 384), (100, 1000), (3, 43, 129), (37, 4096), (5, 7)])
def test_bias_gelu_matches_reference(shape, dtype, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 2).to(dtype).float()
    bias = torch.randn(shape[-1]).to(dtype).float()
    dy = torch.randn(shape).to(dtype).float()

    x32, b32 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    ref = kernel.reference(x32, b32)
    ref.backward(dy)
    xl, bl = x.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()
    low = kernel.reference(xl, bl)
    low.backward(dy.to(dtype))

    xf, bf = guard.place(x.to(dtype), requires_grad=True), guard.place(bias.to(dtype), requires_grad=True)
    fused = kernel.bias_gelu(xf, bf)
    assert fused.dtype == dtype
    fused.backward(guard.place(dy.to(dtype)))
    guard.check()

    assert_close("y", fused, ref, low)
    assert_close("dx", xf.grad, x32.grad, xl.grad)
    rows = x.numel() // shape[-1]
    assert_close("dbias", bf.grad, b32.grad, bl.grad, ulps=4 * rows)  # a sum over rows, in a different order


def test_ops_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    calls = []
    monkeypatch.setattr(kernel.BiasGelu, "apply", lambda *a: calls.append(a) or kernel.reference(*a))
    x, bias = torch.randn(4, 8), torch.randn(8)
    ops.bias_gelu(x, bias)
    assert len(calls) == 1
