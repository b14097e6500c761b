"""The Gumbel-max draws of ``ops.mlm_loss_and_sample``: the noise is the hash its docstrings state (rebuilt here in
plain Python), the kernel's draws are the torch reference's, a draw belongs to its row's key and logits alone, the
draws follow ``softmax(logits / temperature)`` (chi-square), and neither the draws nor the sampling nor its
temperature change the loss or its gradients. Loss and gradients with sampling on are checked in test_mlm_loss.py
like those without."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from kernel_checks import host, to_device
from test_mlm_loss import _inputs, row_keys

from fastbert import ops
from fastbert.data.splitmix import GOLDEN, mix64
from fastbert.kernels import mlm_loss as kernel

MASK32 = 0xFFFFFFFF
SIGNIFICANCE = 1e-6  # a correct sampler fails a chi-square test this rarely; the inputs are fixed, so it never flakes


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def python_gumbel(key: int, vocab_id: int) -> float:
    """The noise as the docstrings of kernels/mlm_loss.py and ops.gumbel_noise state it, on Python ints and floats."""
    lo, hi = key & MASK32, (key >> 32) & MASK32  # Python's >> on a negative int is arithmetic, as in int64
    seed = _mix32(lo ^ _mix32(hi))
    bits = _mix32(seed ^ _mix32(vocab_id))
    u = ((bits >> 9) + 0.5) / 2**23
    return -math.log(-math.log(u))


def splitmix_keys(count: int, seed: int) -> torch.Tensor:
    """Keys the way a caller builds them: SplitMix64 of consecutive positions, as int64."""
    with np.errstate(over="ignore"):
        words = mix64(np.arange(count, dtype=np.uint64) * np.uint64(GOLDEN) + np.uint64(seed))
    return torch.from_numpy(words.view(np.int64).copy())


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")


def test_noise_is_the_documented_hash():
    keys = [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF0, *row_keys(6).tolist()]
    ids = [0, 1, 2, 1023, 1024, 30521, 2**31 - 1]
    noise = ops.gumbel_noise(torch.tensor(keys), torch.tensor(ids))
    assert noise.dtype == torch.float32 and noise.shape == (len(keys), len(ids))
    want = torch.tensor([[python_gumbel(k, v) for v in ids] for k in keys], dtype=torch.float64)
    assert torch.allclose(noise.double(), want, rtol=1e-6, atol=1e-6), (noise.double() - want).abs().max()
    assert not bool((noise[:, None, :] == noise[None, :, :]).all(dim=2).fill_diagonal_(False).any()), "equal rows"


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_kernel_draws_are_the_reference_draws_in_float32(triton_backend, monkeypatch, temperature):
    """Prime rows in uneven blocks, a vocabulary that is not a multiple of BLOCK_V, ignored rows: the same
    tokens as the torch reference, and a valid token for every row, ignored or not; at a sampling temperature too."""
    hidden, weight, bias, labels = _inputs(37, 3001, 48, torch.float32, 0.3, seed=5)
    keys = row_keys(37, seed=6)
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 10 * 3001)
    _, _, samples = ops.mlm_loss_and_sample(*(to_device(t) for t in (hidden, weight, bias, labels, keys)), temperature)
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    _, _, want = ops.mlm_loss_and_sample(hidden, weight, bias, labels, keys, temperature)
    assert torch.equal(host(samples), want)
    if temperature != 1.0:
        assert not torch.equal(ops.mlm_loss_and_sample(hidden, weight, bias, labels, keys)[2], want)
    assert bool(((want >= 0) & (want < 3001)).all())
    assert len(set(want.tolist())) > 30, "draws from 37 different rows of a broad softmax should mostly differ"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_draw_belongs_to_its_key_and_logits(backend, monkeypatch):
    """Shuffling the rows (with their keys) shuffles the draws, whatever the blocks; new keys give new draws."""
    monkeypatch.setenv("FASTBERT_BACKEND", backend)
    hidden, weight, bias, labels = _inputs(23, 1500, 32, torch.float32, 0.2, seed=7)
    keys = row_keys(23, seed=8)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 5 * 1500)
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 5 * 1500)
    first = host(ops.mlm_loss_and_sample(*(to_device(t) for t in (hidden, weight, bias, labels, keys)))[2])
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 1 << 22)
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 1 << 23)
    shuffled = (hidden[order], weight, bias, labels[order], keys[order])
    second = host(ops.mlm_loss_and_sample(*(to_device(t) for t in shuffled))[2])
    assert torch.equal(second, first[order])
    other = (hidden, weight, bias, labels, keys + 1)
    assert not torch.equal(host(ops.mlm_loss_and_sample(*(to_device(t) for t in other))[2]), first)


def _chi_square(samples: torch.Tensor, probabilities: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probabilities.numel()).double()
    expected = probabilities.double() * samples.numel()
    assert bool((expected >= 5).all()), "too few draws per category for the chi-square approximation"
    return ((counts - expected).square() / expected).sum().item()


# 13 tokens with logits spread so that each gets >= 5 expected draws of 600 while softmax(z / 2), what a sampler
# adding 2g instead of g draws from, is off by a chi-square noncentrality of 126: caught with probability 1 - 1e-6.
LOGITS = torch.linspace(-1.5, 1.5, 13)


@pytest.mark.parametrize(
    ("backend", "draws", "temperature"),
    [("triton", 600, 1.0), ("triton", 600, 2.0), ("torch", 200_000, 1.0), ("torch", 600, 2.0)],
)
def test_draws_follow_the_softmax(backend, draws, temperature, monkeypatch):
    """Many rows with the same logits and distinct SplitMix64 keys: the token counts pass a chi-square test
    against ``softmax(logits / temperature)`` at ``SIGNIFICANCE``; the same test rejects the draws of two broken
    samplers built from the same noise (no noise: always the argmax; the other temperature of the two)."""
    monkeypatch.setenv("FASTBERT_BACKEND", backend)
    vocab = LOGITS.numel()
    keys = splitmix_keys(draws, seed=12345)
    weight, bias = torch.eye(vocab, 16), LOGITS.clone()
    hidden, labels = torch.zeros(draws, 16), torch.zeros(draws, dtype=torch.int64)  # every row's logits are LOGITS
    with torch.no_grad():
        inputs = (to_device(t) for t in (hidden, weight, bias, labels, keys))
        _, _, samples = ops.mlm_loss_and_sample(*inputs, temperature)
    critical = scipy.stats.chi2.isf(SIGNIFICANCE, vocab - 1)
    probabilities = torch.softmax(LOGITS.double() / temperature, dim=0)
    statistic = _chi_square(host(samples), probabilities)
    assert statistic < critical, f"chi-square {statistic:.1f} >= {critical:.1f} over {draws} draws"
    noise = ops.gumbel_noise(keys, torch.arange(vocab))
    for broken in (LOGITS.expand(draws, vocab), LOGITS + (3 - temperature) * noise):
        assert _chi_square(broken.argmax(dim=1), probabilities) > critical


def test_a_temperature_must_be_positive():
    hidden, weight, bias, labels = _inputs(3, 50, 8, torch.float32, 0.0, seed=1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            ops.mlm_loss_and_sample(hidden, weight, bias, labels, row_keys(3, seed=2), bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampling_leaves_the_loss_and_gradients_alone(backend, monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", backend)
    hidden, weight, bias, labels = _inputs(11, 1100, 32, torch.float32, 0.2, seed=13)
    keys = row_keys(11, seed=14)
    results = []
    for sample in (False, True):
        leaves = [to_device(t, requires_grad=True) for t in (hidden, weight, bias)]
        args = (*leaves, to_device(labels))
        out = ops.mlm_loss_and_sample(*args, to_device(keys), 2.0) if sample else ops.mlm_loss(*args)
        out[0].backward()
        results.append((host(out[0]), host(out[1]), *(host(leaf.grad) for leaf in leaves)))
        if sample:
            samples = out[2]
            assert samples.dtype == torch.int64 and not samples.requires_grad and samples.grad_fn is None
    for without, with_sampling in zip(*results, strict=True):
        assert torch.equal(without, with_sampling)
