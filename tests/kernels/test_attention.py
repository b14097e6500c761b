"""Flash attention forward and dQ/dK/dV against the float64 reference, varlen and padded, on guarded buffers; ops
dispatch."""

from __future__ import annotations

import functools

import pytest
import torch
import triton
import triton.language as tl
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
    same_arguments,
    spy,
    to_device,
)

from fastbert import ops
from fastbert.kernels import attention as kernel

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


def _sequence_reference(q, k, v, do, o, scale, dtype=torch.float32):
    """One sequence in float64, ``[heads, tokens, head_dim]``: q, do and o (the forward output, which the backward
    reads back as the kernel does) over its queries, k and v over its valid keys. For out, dq, dk and dv returns
    ``(ref, sum_abs, operand_l2)``: the value, the magnitude its float32 error is counted in, and the root sum of
    squares of the terms the kernel rounds to the input dtype before a dot (P for out and dv, dS for dq and dk).

    P's float32 error is relative, of the size of the scores it is made of (``W``); dS = P (dP - delta) adds the
    errors of dP and delta, dot products of d terms (``M``). ``dtype`` is the one P and dS are rounded to."""
    heads, queries, head_dim = q.shape
    if k.shape[1] == 0:  # no valid key: zero output and gradients
        zero_q, zero_k = q.new_zeros(q.shape), k.new_zeros(k.shape)
        return {"out": (zero_q,) * 3, "dq": (zero_q,) * 3, "dk": (zero_k,) * 3, "dv": (zero_k,) * 3}
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    p = (scale * q @ t(k)).softmax(dim=-1)
    scores = scale * q.abs() @ t(k.abs())
    w = p * (1 + scores + (p * scores).sum(dim=-1, keepdim=True))
    dp_delta = do @ t(v) - (do * o).sum(dim=-1, keepdim=True)
    ds = p * dp_delta
    m = w * dp_delta.abs() + p * (do.abs() @ t(v.abs()) + (do * o).abs().sum(dim=-1, keepdim=True))
    p2, ds2 = rounded_magnitude(p, dtype).square(), rounded_magnitude(ds, dtype).square()
    return {
        "out": (p @ v, w @ v.abs(), (p2 @ v.square()).sqrt()),
        "dq": (scale * ds @ k, scale * m @ k.abs(), scale * (ds2 @ k.square()).sqrt()),
        "dk": (scale * t(ds) @ q, scale * t(m) @ q.abs(), scale * (t(ds2) @ q.square()).sqrt()),
        "dv": (t(p) @ do, t(w) @ do.abs(), (t(p2) @ do.square()).sqrt()),
    }


def _compare_all(outputs, reference, ops):
    """``outputs``: name -> the kernel's tensor; ``reference``: name -> (ref, sum_abs, operand_l2)."""
    return {
        name: compare(
            name, fused, reference[name][0], sum_abs=reference[name][1], ops=ops, operand_l2=reference[name][2]
        )
        for name, fused in outputs.items()
    }


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VARLEN_CASES = [  # sequence lengths, head_dim
    ([1, 37, 128], 32),
    ([1, 37, 128], 64),
    ([1, 37, 128], 128),
    ([100], 64),
    ([129], 64),
    ([1], 128),
    ([5, 0, 17], 32),
]


@functools.cache
def varlen_comparisons(lengths: tuple[int, ...], head_dim: int, dtype: torch.dtype) -> dict[str, Comparison]:
    """The kernel run once on guarded buffers; out, dq, dk, dv against float64 from the same rounded inputs
    (cached: test_mutations.py reuses it)."""
    cu = _cu_seqlens(list(lengths))
    max_seqlen = max(lengths)
    qkv, do = _qkv(sum(lengths), head_dim, dtype, seed=sum(lengths) + head_dim)
    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        guarded_cu = guard.place(cu)
        out, grad = _varlen(
            lambda q, k, v: kernel.attention(q, k, v, guarded_cu, max_seqlen), qkv, do, dtype, guard.place
        )
    guard.check()
    assert out.dtype == grad.dtype == dtype

    scale = head_dim**-0.5
    parts = {name: [] for name in ("out", "dq", "dk", "dv")}
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = (qkv[lo:hi, i].double().transpose(0, 1) for i in range(3))
        sequence = _sequence_reference(
            q, k, v, do[lo:hi].double().transpose(0, 1), host(out[lo:hi]).double().transpose(0, 1), scale, dtype
        )
        for name, tensors in sequence.items():
            parts[name].append([x.transpose(0, 1) for x in tensors])
    reference = {name: [torch.cat(column) for column in zip(*chunks, strict=True)] for name, chunks in parts.items()}
    outputs = {"out": out, "dq": grad[:, 0], "dk": grad[:, 1], "dv": grad[:, 2]}
    return _compare_all(outputs, reference, ops=max_seqlen + 2 * head_dim + 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lengths", "head_dim"), VARLEN_CASES)
def test_varlen_attention_matches_reference(lengths, head_dim, dtype):
    for comparison in varlen_comparisons(tuple(lengths), head_dim, dtype).values():
        comparison.check()


def test_reference_gradients_are_autograd_of_softmax_attention():
    """``_sequence_reference``'s hand-written backward is the gradient of softmax attention (given the exact output)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(HEADS, 9, 16, generator=g, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = torch.softmax(0.3 * leaves[0] @ leaves[1].transpose(1, 2), dim=-1) @ leaves[2]
    out.backward(do)
    ref = _sequence_reference(q, k, v, do, out.detach(), 0.3)
    torch.testing.assert_close(ref["out"][0], out.detach())
    for name, leaf in zip(("dq", "dk", "dv"), leaves, strict=True):
        torch.testing.assert_close(ref[name][0], leaf.grad)


PADDED_LENGTHS, PADDED_SEQ, PADDED_SCALE = (70, 0, 100, 1), 100, 0.3  # row 1 is all padding


@functools.cache
def padded_comparisons(dtype: torch.dtype) -> dict[str, Comparison]:
    """The padded layout with a key padding mask (queries at padding positions computed too), run once."""
    lengths, seq, head_dim = PADDED_LENGTHS, PADDED_SEQ, 64
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(len(lengths), seq, 3, HEADS, head_dim, generator=g).to(dtype)
    do = torch.randn(len(lengths), seq, HEADS, head_dim, generator=g).to(dtype)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    guard = GuardedBuffers()
    with patched(kernel, _empty=guard.empty):
        leaf = guard.place(qkv, requires_grad=True)
        out = kernel.attention_padded(*leaf.unbind(2), guard.place(mask), softmax_scale=PADDED_SCALE)
        out.backward(guard.place(do))
    guard.check()
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a fully padded row attends to nothing"
    assert torch.equal(leaf.grad[0, 70:, 1:], torch.zeros_like(leaf.grad[0, 70:, 1:])), "padding keys get no grad"

    rows = []
    for b, n in enumerate(lengths):
        q, k, v = (qkv[b, :, i].double().transpose(0, 1) for i in range(3))
        sequence = _sequence_reference(
            q,
            k[:, :n],
            v[:, :n],
            do[b].double().transpose(0, 1),
            host(out[b]).double().transpose(0, 1),
            PADDED_SCALE,
            dtype,
        )
        for name in ("dk", "dv"):  # keys past the valid ones: zero gradient
            sequence[name] = [torch.cat([x, x.new_zeros(HEADS, seq - n, head_dim)], dim=1) for x in sequence[name]]
        rows.append({name: [x.transpose(0, 1) for x in tensors] for name, tensors in sequence.items()})
    reference = {name: [torch.stack([row[name][j] for row in rows]) for j in range(3)] for name in rows[0]}
    outputs = {"out": out, "dq": leaf.grad[:, :, 0], "dk": leaf.grad[:, :, 1], "dv": leaf.grad[:, :, 2]}
    return _compare_all(outputs, reference, ops=seq + 2 * head_dim + 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_attention_with_key_padding_mask(dtype):
    for comparison in padded_comparisons(dtype).values():
        comparison.check()


def test_padded_attention_rejects_left_padding():
    q = torch.randn(2, 8, HEADS, 32, device=DEVICE)
    mask = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
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

    keep = torch.empty(len(lengths) * HEADS, max_seqlen, max_seqlen, device=DEVICE)
    _dropout_keep_grid[(len(lengths) * HEADS,)](keep, HEADS, max_seqlen, p, seed, BLOCK=128)
    keep = host(keep).view(len(lengths), HEADS, max_seqlen, max_seqlen)
    valid = keep[1]  # the 100-token sequence fills its whole grid
    dropped = 1 - valid.mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / valid.numel()) ** 0.5, f"dropped fraction {dropped} for p={p}"
    # Four adjacent keys share one philox call: their draws must still be independent.
    both = ((valid[..., :-1] == 0) & (valid[..., 1:] == 0)).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / valid[..., 1:].numel()) ** 0.5, f"adjacent pairs {both}"

    def clone(t, requires_grad=False):
        return t.clone().requires_grad_(requires_grad)

    out_ref, g_ref = _varlen(
        lambda q, k, v: kernel.reference(q, k, v, cu, max_seqlen, keep=keep, dropout_p=p), qkv, do, torch.float32, clone
    )
    device_cu = cu.to(DEVICE)
    out, grad = _varlen(
        lambda q, k, v: kernel.attention(q, k, v, device_cu, max_seqlen, p, seed=seed),
        qkv,
        do,
        torch.float32,
        guard.place,
    )
    guard.check()
    assert_close("out", out, out_ref, out_ref, ulps=16)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(name, grad[:, i], g_ref[:, i], g_ref[:, i], ulps=16 + max_seqlen**0.5)

    again, _ = _varlen(
        lambda q, k, v: kernel.attention(q, k, v, device_cu, max_seqlen, p, seed=seed),
        qkv,
        do,
        torch.float32,
        to_device,
    )
    other, _ = _varlen(
        lambda q, k, v: kernel.attention(q, k, v, device_cu, max_seqlen, p, seed=seed + 1),
        qkv,
        do,
        torch.float32,
        to_device,
    )
    assert torch.equal(again, out), "the same seed must give the same mask"
    assert not torch.equal(other, out), "a different seed must give a different mask"


def test_unsupported_head_dim_is_rejected():
    q = torch.randn(4, HEADS, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim=48"):
        kernel.attention(q, q, q, _cu_seqlens([4]).to(DEVICE), 4)


def test_ops_dispatches_to_the_kernel(monkeypatch):
    lengths = [3, 9]
    cu = _cu_seqlens(lengths)
    qkv, _ = _qkv(sum(lengths), 32, torch.float32, seed=1)
    q, k, v = qkv.unbind(1)
    ref = ops.attention_reference(q, k, v, cu, max(lengths), softmax_scale=0.3)
    dq, dk, dv, dcu = (to_device(t) for t in (q, k, v, cu))  # where the kernel runs: the CPU only when interpreted
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")
    calls = spy(monkeypatch, kernel, "attention")
    with monkeypatch.context() as m:
        forbid(m, ops, "attention_reference", "ops.attention fell back to the torch reference")
        out = ops.attention(dq, dk, dv, dcu, max(lengths), softmax_scale=0.3)
        if DEVICE.type == "cuda":  # auto: CUDA tensors take the kernel
            monkeypatch.setenv("FASTBERT_BACKEND", "auto")
            ops.attention(dq, dk, dv, dcu, max(lengths), softmax_scale=0.3)
    assert len(calls) == 1 + (DEVICE.type == "cuda")
    assert all(same_arguments(args, (dq, dk, dv, dcu, max(lengths), 0.0, 0.3)) for args, _ in calls)
    assert_close("out", out, ref, ref, ulps=16)
    for backend in ("torch", "auto"):  # auto: CPU tensors take the reference
        monkeypatch.setenv("FASTBERT_BACKEND", backend)
        forbid(monkeypatch, kernel, "attention", f"FASTBERT_BACKEND={backend} used the kernel")
        torch.testing.assert_close(ops.attention(q, k, v, cu, max(lengths), softmax_scale=0.3), ref)
