"""Flash attention forward and dQ/dK/dV against the fp32 reference, varlen and padded, on guarded buffers."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from fastbert.kernels import attention as kernel
from kernel_checks import GuardedBuffers, assert_close

from fastbert import ops

HEADS = 2


@triton.jit
def _dropout_keep_grid(Keep, heads, max_seqlen, dropout_p, seed, BLOCK: tl.constexpr):
    """The kernels' own keep-mask, written out as [batch * heads, max_seqlen, max_seqlen] for the reference."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK)
    mask = (rows[:, None] < max_seqlen) & (rows[None, :] < max_seqlen)
    keep = kernel._keep(seed, bh, rows, 0, max_seqlen, dropout_p, BLOCK, BLOCK)
    offsets = bh * max_seqlen * max_seqlen + rows[:, None] * max_seqlen + rows[None, :]
    tl.store(Keep + offsets, keep.to(tl.float32), mask=mask)


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(total, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, 3, HEADS, head_dim, generator=g).to(dtype).float()
    do = torch.randn(total, HEADS, head_dim, generator=g).to(dtype).float()
    return qkv, do


def _varlen(fn, qkv, do, dtype, place):
    leaf = place(qkv.to(dtype), requires_grad=True)
    out = fn(*leaf.unbind(1))  # strided views into one buffer, like the model's fused QKV projection
    out.backward(place(do.to(dtype)))
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("lengths", "head_dim"), [
    ([1, 37, 128], 32), ([1, 37, 128], 64), ([1, 37, 128], 128),
    ([100], 64), ([129], 64), ([1], 128), ([5, 0, 17], 32),
])
def test_varlen_attention_matches_reference(lengths, head_dim, dtype, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    cu = _cu_seqlens(lengths)
    max_seqlen = max(lengths)
    qkv, do = _qkv(sum(lengths), head_dim, dtype, seed=sum(lengths) + head_dim)

    def clone(t, requires_grad=False):
        return t.clone().requires_grad_(requires_grad)

    out_ref, g_ref = _varlen(lambda q, k, v: kernel.reference(q, k, v, cu, max_seqlen), qkv, do, torch.float32, clone)
    out_low, g_low = _varlen(lambda q, k, v: kernel.reference_low_precision(q, k, v, cu, max_seqlen), qkv, do, dtype,
                             clone)
    guarded_cu = guard.place(cu)
    out, grad = _varlen(lambda q, k, v: kernel.attention(q, k, v, guarded_cu, max_seqlen), qkv, do, dtype,
                        guard.place)
    guard.check()
    assert out.dtype == dtype
    assert_close("out", out, out_ref, out_low)
    # dq, dk, dv are sums over a sequence's keys or queries, in another order than torch's.
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, grad[:, i], g_ref[:, i], g_low[:, i], ulps=4 + max_seqlen**0.5, magnitude=1.0)


def _padded_reference(q, k, v, lengths, scale):
    outs = []
    for b, n in enumerate(lengths):
        qs, ks, vs = (x[b].transpose(0, 1).float() for x in (q, k, v))
        if n == 0:
            outs.append(torch.zeros_like(qs).transpose(0, 1))
            continue
        probs = torch.softmax(qs @ ks[:, :n].transpose(1, 2) * scale, dim=-1)
        outs.append((probs @ vs[:, :n]).transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_attention_with_key_padding_mask(dtype, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    lengths, seq, head_dim = [70, 0, 100, 1], 100, 64  # row 1 is all padding
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(len(lengths), seq, 3, HEADS, head_dim, generator=g).to(dtype).float()
    do = torch.randn(len(lengths), seq, HEADS, head_dim, generator=g).to(dtype).float()
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    scale = 0.3

    ref_leaf = qkv.clone().requires_grad_()
    ref = _padded_reference(*ref_leaf.unbind(2), lengths, scale)
    ref.backward(do)
    leaf = guard.place(qkv.to(dtype), requires_grad=True)
    out = kernel.attention_padded(*leaf.unbind(2), guard.place(mask), softmax_scale=scale)
    out.backward(guard.place(do.to(dtype)))
    guard.check()
    assert_close("out", out, ref, ref.to(dtype), ulps=8)
    assert_close("dqkv", leaf.grad, ref_leaf.grad, ref_leaf.grad.to(dtype), ulps=8 + seq**0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a fully padded row attends to nothing"
    assert torch.equal(leaf.grad[0, 70:, 1:], torch.zeros_like(leaf.grad[0, 70:, 1:])), "padding keys get no grad"


def test_padded_attention_rejects_left_padding():
    q = torch.randn(2, 8, HEADS, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 0] = False
    with pytest.raises(ValueError, match="row 1"):
        kernel.attention_padded(q, q, q, mask)


@pytest.mark.parametrize("head_dim", [32, 128])
def test_dropout_mask_is_reproducible_and_regenerated_in_backward(head_dim, monkeypatch):
    guard = GuardedBuffers()
    monkeypatch.setattr(kernel, "_empty", guard.empty)
    lengths, p, seed = [37, 100], 0.3, 4321
    cu, max_seqlen = _cu_seqlens(lengths), max(lengths)
    qkv, do = _qkv(sum(lengths), head_dim, torch.float32, seed=7)

    keep = torch.empty(len(lengths) * HEADS, max_seqlen, max_seqlen)
    _dropout_keep_grid[(len(lengths) * HEADS,)](keep, HEADS, max_seqlen, p, seed, BLOCK=128)
    keep = keep.view(len(lengths), HEADS, max_seqlen, max_seqlen)
    valid = keep[1]  # the 100-token sequence fills its whole grid
    dropped = 1 - valid.mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / valid.numel()) ** 0.5, f"dropped fraction {dropped} for p={p}"
    # Four adjacent keys share one philox call: their draws must still be independent.
    both = ((valid[..., :-1] == 0) & (valid[..., 1:] == 0)).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / valid[..., 1:].numel()) ** 0.5, f"adjacent pairs {both}"

    def clone(t, requires_grad=False):
        return t.clone().requires_grad_(requires_grad)

    out_ref, g_ref = _varlen(lambda q, k, v: kernel.reference(q, k, v, cu, max_seqlen, keep=keep, dropout_p=p), qkv,
                             do, torch.float32, clone)
    out, grad = _varlen(lambda q, k, v: kernel.attention(q, k, v, cu, max_seqlen, p, seed=seed), qkv, do,
                        torch.float32, guard.place)
    guard.check()
    assert_close("out", out, out_ref, out_ref, ulps=16)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, grad[:, i], g_ref[:, i], g_ref[:, i], ulps=16 + max_seqlen**0.5)

    again, _ = _varlen(lambda q, k, v: kernel.attention(q, k, v, cu, max_seqlen, p, seed=seed), qkv, do,
                       torch.float32, clone)
    other, _ = _varlen(lambda q, k, v: kernel.attention(q, k, v, cu, max_seqlen, p, seed=seed + 1), qkv, do,
                       torch.float32, clone)
    assert torch.equal(again, out), "the same seed must give the same mask"
    assert not torch.equal(other, out), "a different seed must give a different mask"


def test_unsupported_head_dim_is_rejected():
    q = torch.randn(4, HEADS, 48)
    with pytest.raises(ValueError, match="head_dim=48"):
        kernel.attention(q, q, q, _cu_seqlens([4]), 4)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    lengths = [3, 9]
    cu = _cu_seqlens(lengths)
    qkv, _ = _qkv(sum(lengths), 32, torch.float32, seed=1)
    q, k, v = qkv.unbind(1)
    out = ops.attention(q, k, v, cu, max(lengths))
    ref = ops.attention_reference(q, k, v, cu, max(lengths))
    assert_close("out", out, ref, ref, ulps=16)
