"""The torch references in fastbert.ops against plain PyTorch written the obvious way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastbert import config, ops


@pytest.mark.parametrize("chunk_elements", [1 << 23, 20000])  # one block, and many uneven blocks
@pytest.mark.parametrize("rows", [1, 37])
def test_mlm_loss_matches_cross_entropy(monkeypatch, chunk_elements, rows):
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(rows)
    vocab, width = 3001, 48
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::3] = -100 if rows > 1 else labels[::3]
    loss, accuracy = ops.mlm_loss(hidden, weight, bias, labels)
    logits = hidden @ weight.T + bias
    ref = F.cross_entropy(logits, labels, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)  # float64 in, float64 all the way
    valid = labels != -100
    assert accuracy.item() == pytest.approx((logits.argmax(1) == labels)[valid].float().mean().item())
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    refs = torch.autograd.grad(ref, (hidden, weight, bias))
    for got, want in zip(grads, refs, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("chunk_elements", "vocab"), [(20000, 3001), (9 * 3001 + 5, 3001), (2 * 3001, 3001)])
def test_every_mlm_block_starts_its_row_outputs_16_byte_aligned(chunk_elements, vocab):
    """The host loop hands the per-block function views of its float32 row outputs; the Triton kernel is compiled
    ahead of time for 16-byte aligned pointers, so a block of 6 or 9 rows must be cut to 4 or 8 (and 2 kept)."""
    starts = []

    def rows(logits, labels, inv_denom, keys, loss_out, correct_out, samples_out, want_grad, temperature):
        starts.append((loss_out.data_ptr() % 16, correct_out.data_ptr() % 16, samples_out.data_ptr() % 16, len(labels)))
        return ops._mlm_rows_reference(logits, labels, inv_denom, keys, loss_out, correct_out, samples_out, want_grad)

    g = torch.Generator().manual_seed(0)
    count = 37
    hidden = torch.randn(count, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g)
    labels = torch.randint(0, vocab, (count,), generator=g)
    keys = torch.arange(count, dtype=torch.int64)
    loss, _, _ = ops._MLMLoss.apply(hidden, weight, torch.zeros(vocab), labels, keys, rows, chunk_elements, 1.0)
    block = chunk_elements // vocab
    want = block - block % 4 if block >= 4 else block
    assert [n for *_, n in starts] == [min(want, count - i) for i in range(0, count, want)]
    if block >= 4:
        assert all(a == b == c == 0 for a, b, c, _ in starts)
    ref = F.cross_entropy(hidden @ weight.T, labels)
    torch.testing.assert_close(loss, ref)


def test_mlm_loss_with_no_labelled_rows_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss, accuracy = ops.mlm_loss(hidden, weight, torch.zeros(50), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and accuracy.item() == 0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_varlen_attention_matches_per_sequence_softmax():
    g = torch.Generator().manual_seed(0)
    lengths = [1, 37, 0, 128, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 4, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = ops.attention(q, k, v, cu, max(lengths), softmax_scale=0.3)
    for i, _n in enumerate(lengths):
        s = slice(int(cu[i]), int(cu[i + 1]))
        scores = torch.einsum("qhd,khd->hqk", q[s], k[s]) * 0.3
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s])
        torch.testing.assert_close(out[s], ref)


def _padded_attention_by_hand(q, k, v, keep, scale, dropout_keep=None):
    """Per-sequence softmax over the kept keys of ``[batch, seq, heads, head_dim]`` inputs; zero for a sequence
    with no key."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    if dropout_keep is not None:
        probs = probs * dropout_keep
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def test_padded_attention_matches_per_sequence_softmax(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 6, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.arange(6)[None, :] < torch.tensor([6, 2, 0])[:, None]  # full, right-padded, no key at all
    out = ops.attention_padded(q, k, v, keep.long(), softmax_scale=0.3)
    torch.testing.assert_close(out, _padded_attention_by_hand(q, k, v, keep, 0.3))
    assert bool((out[2] == 0).all())
    everything = torch.ones(3, 6, dtype=torch.bool)
    torch.testing.assert_close(ops.attention_padded(q, k, v), _padded_attention_by_hand(q, k, v, everything, 0.25))
    torch.manual_seed(5)
    dropped = ops.attention_padded(q, k, v, keep, dropout_p=0.25, softmax_scale=0.3)
    torch.manual_seed(5)  # the same draws: one mask over [batch, heads, queries, keys]
    mask = ops.dropout_mask((3, 2, 6, 6), 0.25, q.device, q.dtype)
    torch.testing.assert_close(dropped, _padded_attention_by_hand(q, k, v, keep, 0.3, mask))


def test_fused_self_attention_uses_the_padded_op(monkeypatch):
    from fastbert import nn as fnn

    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    torch.manual_seed(0)
    attention = fnn.FusedSelfAttention(32, 2).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out, _ = attention(x, mask)
    q, k, v = (proj(x).view(2, 5, 2, 16) for proj in (attention.query, attention.key, attention.value))
    torch.testing.assert_close(out, _padded_attention_by_hand(q, k, v, mask.bool(), 16**-0.5).reshape(2, 5, 32))


def test_residual_layer_norm_and_bias_gelu():
    g = torch.Generator().manual_seed(0)
    x, r, b = torch.randn(7, 384, generator=g), torch.randn(7, 384, generator=g), torch.randn(384, generator=g)
    w, lb = torch.rand(384, generator=g), torch.randn(384, generator=g)
    normed, summed = ops.residual_layer_norm(x, r, w, lb, 1e-12, x_bias=b)
    s = x + b + r
    ref = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + 1e-12) * w + lb
    torch.testing.assert_close(summed, s)
    torch.testing.assert_close(normed, ref, rtol=1e-5, atol=1e-5)
    y = ops.bias_gelu(x, b)
    torch.testing.assert_close(y, 0.5 * (x + b) * (1 + torch.erf((x + b) / 2**0.5)))


def test_backend_setting_is_validated(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND='cuda'"):
        ops.backend_setting()


def test_dropout_rate_scale_and_determinism():
    x = torch.ones(1000, 1000)
    torch.manual_seed(3)
    y = ops.dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # 1M draws: the std of the rate is 0.0003
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - 6554)))
    assert abs(y.mean().item() - 1.0) < 0.003
    torch.manual_seed(3)
    assert torch.equal(ops.dropout(x, 0.1), y)
    assert ops.dropout(x, 0.1, training=False) is x
    # Gradient is the same mask.
    torch.manual_seed(4)
    z = torch.randn(64, 64, requires_grad=True)
    out = ops.dropout(z, 0.5)
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.where(out == 0, 0.0, 2.0))


def test_one_ignore_index():
    """fastbert.config owns the label that carries no loss; ops re-exports it and the Triton kernel agrees."""
    mlm_kernel = pytest.importorskip("fastbert.kernels.mlm_loss")
    assert ops.IGNORE_INDEX == mlm_kernel.IGNORE_INDEX == config.IGNORE_INDEX == -100
