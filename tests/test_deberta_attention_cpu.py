"""``ops.disentangled_attention`` by query blocks (the CPU path for long sequences) against the whole-matrix
reference of ``fastbert.kernels.disentangled_attention``: outputs and every gradient (queries, keys, values, both
position projections) in float64, with blocks much shorter than the sequence, log buckets shorter than the
distances, padding and a sequence with no real key; and with dropout, against the reference given the same masks."""

from __future__ import annotations

import pytest
import torch

from fastbert import ops
from fastbert.kernels import disentangled_attention as dsa

BATCH, HEADS, LENGTH, DIM, BUCKETS, MAX_DISTANCE = 3, 2, 70, 8, 8, 64


@pytest.fixture
def blocked(monkeypatch):
    """Blocks of 16 query rows, and the blocked function whatever the size."""
    monkeypatch.setattr(ops, "_DISENTANGLED_BLOCK", BATCH * HEADS * LENGTH * 16)
    monkeypatch.setattr(ops, "_DISENTANGLED_WHOLE", 0)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, LENGTH, DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    pos_key, pos_query = (torch.randn(HEADS, 2 * BUCKETS, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.arange(LENGTH)[None, :] < torch.tensor([LENGTH, 33, 0])[:, None]  # the last: no real key at all
    rel = dsa.relative_index(LENGTH, BUCKETS, MAX_DISTANCE)
    return [x.requires_grad_() for x in (q, k, v, pos_key, pos_query)], mask, rel


@pytest.mark.parametrize("terms", ["c2p+p2c", "c2p", "p2c", "none"])
def test_blocks_give_the_reference_and_its_gradients(blocked, terms):
    (q, k, v, pos_key, pos_query), mask, rel = _inputs()
    pk = pos_key if "c2p" in terms else None
    pq = pos_query if "p2c" in terms else None
    leaves = [x for x in (q, k, v, pk, pq) if x is not None]
    grad = torch.randn(BATCH, HEADS, LENGTH, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ours = ops.disentangled_attention(q, k, v, rel, pk, pq, mask, position_terms=2)
    reference = dsa.reference(q, k, v, rel, pk, pq, mask, position_terms=2)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(reference, leaves, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_dropout_is_the_reference_with_the_blocks_masks(blocked):
    """The masks are drawn block by block from torch's generator (and drawn again in the backward pass from the saved
    state); the reference is given the same masks, assembled by hand."""
    (q, k, v, pos_key, pos_query), mask, rel = _inputs(1)
    p = 0.25
    torch.manual_seed(5)
    ours = ops.disentangled_attention(q, k, v, rel, pos_key, pos_query, mask, dropout_p=p)
    torch.manual_seed(5)
    keep = torch.cat(
        [
            ops.dropout_mask((BATCH, HEADS, min(16, LENGTH - start), LENGTH), p, q.device, torch.float64)
            for start in range(0, LENGTH, 16)
        ],
        dim=2,
    )
    scale = dsa.score_scale(DIM, 2)
    scores = q @ k.transpose(-1, -2)
    scores = scores + torch.gather(q @ pos_key.transpose(-1, -2), -1, rel.expand(BATCH, HEADS, LENGTH, LENGTH))
    by_key = torch.gather(k @ pos_query.transpose(-1, -2), -1, rel.t().expand(BATCH, HEADS, LENGTH, LENGTH))
    scores = (scores + by_key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    reference = (scores.softmax(-1) * keep) @ v
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    leaves = (q, k, v, pos_key, pos_query)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(reference, leaves, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_short_sequences_take_the_reference_and_long_ones_the_blocks(monkeypatch):
    calls = []
    real = ops._BlockedDisentangledAttention.apply
    monkeypatch.setattr(ops._BlockedDisentangledAttention, "apply", lambda *a: calls.append(1) or real(*a))
    (q, k, v, pos_key, pos_query), mask, rel = _inputs()
    ops.disentangled_attention(q, k, v, rel, pos_key, pos_query, mask)
    assert not calls  # 3 x 2 x 70 x 70 scores: the whole-matrix reference
    monkeypatch.setattr(ops, "_DISENTANGLED_WHOLE", BATCH * HEADS * LENGTH * LENGTH - 1)
    ops.disentangled_attention(q, k, v, rel, pos_key, pos_query, mask)
    assert calls == [1]


@pytest.mark.parametrize(
    ("length", "buckets"), [(2048, (256, 512)), (300, (16, 64)), (70, (-1, 24)), (1, (8, 16)), (0, (8, 16))]
)
def test_the_models_relative_index_is_the_kernels_reference(length, buckets):
    """The model's table rows (looked up from one log a distance) equal the kernel module's reference (a log a pair)
    through the exact band, the log buckets and the clamp; at 2048 tokens every bucket edge of DeBERTa-v3's 256
    buckets over 512 positions."""
    assert torch.equal(ops.relative_index(length, *buckets), dsa.relative_index(length, *buckets))
