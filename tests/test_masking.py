"""MaskingCollator: BERT's masking statistics, special tokens, determinism across batchings, layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbert.data import masking
from fastbert.data.masking import MASKING_SCHEMES, MaskingCollator
from fastbert.data.shards import Sample

VOCAB, PAD, UNK, CLS, SEP, MASK = 30522, 0, 100, 101, 102, 103
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def make_samples(count: int, seed: int = 0, continuation_ids=()) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        la, lb = rng.integers(1, 80), rng.integers(1, 45)
        a, b = rng.integers(1000, VOCAB, la), rng.integers(1000, VOCAB, lb)
        ids = np.concatenate([[CLS], a, [SEP], b, [SEP]])
        types = np.concatenate([np.zeros(la + 2), np.ones(lb + 1)]).astype(np.int64)
        samples.append(Sample(ids, types, int(rng.integers(0, 2))))
    return samples


def collator(**kw) -> MaskingCollator:
    return MaskingCollator(VOCAB, SPECIALS, MASK, seed=7, **kw)


def test_masking_statistics_over_a_million_tokens():
    samples = make_samples(16_500)
    c = collator(padded=True)
    selected = maskable = masked = randomized = kept = 0
    for start in range(0, len(samples), 1000):
        chunk = samples[start : start + 1000]
        batch = c(chunk, np.arange(start, start + len(chunk)), np.zeros(len(chunk), dtype=np.int64))
        ids = torch.zeros_like(batch["input_ids"])
        for i, s in enumerate(chunk):
            ids[i, : len(s.input_ids)] = torch.from_numpy(s.input_ids)
        real = batch["attention_mask"].bool()
        special = torch.isin(ids, torch.tensor(SPECIALS))
        sel = batch["labels"] != -100
        assert not (sel & special).any(), "a special token was selected"
        assert not (sel & ~real).any(), "padding was selected"
        assert torch.equal(batch["labels"][sel], ids[sel])
        assert torch.equal(batch["input_ids"][~sel], ids[~sel]), "an unselected token changed"
        out = batch["input_ids"][sel]
        selected += int(sel.sum())
        maskable += int((real & ~special).sum())
        masked += int((out == MASK).sum())
        kept += int((out == ids[sel]).sum())
        randomized += int(((out != MASK) & (out != ids[sel])).sum())
        assert not torch.isin(out[(out != MASK) & (out != ids[sel])], torch.tensor(SPECIALS)).any()
    assert maskable > 1_000_000
    assert abs(selected / maskable - 0.15) <= 0.003
    assert abs(masked / selected - 0.8) <= 0.01
    assert abs(randomized / selected - 0.1) <= 0.01
    assert abs(kept / selected - 0.1) <= 0.01


def test_a_sample_is_masked_the_same_in_any_batch():
    samples = make_samples(64)
    c = collator()
    idx, epochs = np.arange(100, 164), np.full(64, 3)
    whole = c(samples, idx, epochs)
    per_sample = {}
    for lo in range(0, 64, 5):  # other batch sizes and compositions
        part = c(samples[lo : lo + 5][::-1], idx[lo : lo + 5][::-1], epochs[lo : lo + 5])
        cu = part["cu_seqlens"]
        for j, sample_index in enumerate(part["sample_index"].tolist()):
            per_sample[sample_index] = part["input_ids"][cu[j] : cu[j + 1]]
    cu = whole["cu_seqlens"]
    for j, sample_index in enumerate(idx.tolist()):
        assert torch.equal(whole["input_ids"][cu[j] : cu[j + 1]], per_sample[sample_index])
    other_epoch = c(samples, idx, epochs + 1)
    assert not torch.equal(other_epoch["input_ids"], whole["input_ids"]), "a new epoch must mask anew"


def test_unpadded_and_padded_layouts_agree():
    samples = make_samples(9)
    idx, ep = np.arange(9), np.zeros(9, dtype=np.int64)
    flat, padded = collator()(samples, idx, ep), collator(padded=True)(samples, idx, ep)
    real = padded["attention_mask"].bool()
    assert torch.equal(flat["input_ids"], padded["input_ids"][real])
    assert torch.equal(flat["labels"], padded["labels"][real])
    assert torch.equal(flat["token_type_ids"], padded["token_type_ids"][real])
    assert torch.equal(flat["position_ids"], real.nonzero()[:, 1])
    assert flat["cu_seqlens"].tolist() == [0, *real.sum(1).cumsum(0).tolist()]
    assert torch.equal(flat["masked_labels"], flat["labels"][flat["masked_positions"]])
    assert flat["next_sentence_label"].tolist() == [s.sentence_label for s in samples]


def test_predictions_are_capped():
    long = [Sample(np.concatenate([[CLS], np.full(510, 2000), [SEP]]), np.zeros(512, dtype=np.int64), 0)] * 50
    batch = collator(padded=True)(long, np.arange(50), np.zeros(50, dtype=np.int64))
    assert (batch["labels"] != -100).sum(1).max() <= 80
    batch = collator(padded=True, max_predictions=5)(long, np.arange(50), np.zeros(50, dtype=np.int64))
    assert (batch["labels"] != -100).sum(1).max() <= 5


def test_whole_word_masking_takes_words_whole():
    cont = list(range(5000, 6000))  # ids that act as ## continuations
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(400):
        words = [
            np.concatenate([[rng.integers(1000, 5000)], rng.integers(5000, 6000, rng.integers(0, 3))])
            for _ in range(rng.integers(5, 40))
        ]
        body = np.concatenate(words)
        samples.append(Sample(np.concatenate([[CLS], body, [SEP]]), np.zeros(len(body) + 2, dtype=np.int64)))
    c = collator(padded=True, masking="whole-word", continuation_ids=cont)
    batch = c(samples, np.arange(400), np.zeros(400, dtype=np.int64))
    sel = (batch["labels"] != -100).numpy()
    total = 0
    for i, s in enumerate(samples):
        is_cont = np.isin(s.input_ids, cont)
        row = sel[i, : len(s.input_ids)]
        # a continuation is selected exactly when the token before it is
        for t in np.flatnonzero(is_cont):
            assert row[t] == row[t - 1]
        total += row.sum()
    assert 0.12 < total / sum(len(s.input_ids) - 2 for s in samples) <= 0.15


@pytest.mark.parametrize("workers", [0, 2])
def test_works_in_a_dataloader_with_workers(workers):
    from fastbert.data.sampler import MicroBatchDataset, MicroBatchPlan

    samples = make_samples(50)
    plan = MicroBatchPlan(num_samples=50, global_batch=8, micro_batch=4, seed=1)
    data = MicroBatchDataset(samples, plan, collator())
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(3, 9), num_workers=workers)
    got = [(b["position"], b["input_ids"]) for b in loader]
    assert [p for p, _ in got] == list(range(3, 9))
    for position, ids in got:
        assert torch.equal(ids, data[position]["input_ids"])


@pytest.mark.parametrize("masking", MASKING_SCHEMES)
@pytest.mark.parametrize("probability,max_predictions", [(0.15, None), (0.5, None), (0.4, 3)])
def test_cpp_masking_is_the_numpy_reference(masking, probability, max_predictions):
    cont = list(range(5000, 6000))
    rng = np.random.default_rng(2)
    c = MaskingCollator(
        VOCAB,
        SPECIALS,
        MASK,
        seed=11,
        mlm_probability=probability,
        max_predictions=max_predictions,
        masking=masking,
        continuation_ids=cont,
    )
    for trial in range(20):
        batch, seq = int(rng.integers(1, 12)), int(rng.integers(1, 140))
        lengths = rng.integers(0, seq + 1, batch)
        ids = np.where(
            rng.random((batch, seq)) < 0.3,
            rng.integers(5000, 6000, (batch, seq)),
            rng.integers(1000, VOCAB, (batch, seq)),
        )
        ids[:, 0] = CLS
        ids[np.arange(seq)[None, :] >= lengths[:, None]] = PAD
        ids[rng.random((batch, seq)) < 0.05] = UNK  # specials inside sequences too
        samples, epochs = rng.integers(0, 10**6, batch), rng.integers(0, 5, batch)
        got, expected = c.mask(ids, lengths, samples, epochs), c.mask_reference(ids, lengths, samples, epochs)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), trial


def test_masking_refuses_ids_outside_the_vocabulary():
    c = collator()
    ids = np.array([[CLS, 2000, VOCAB + 5, SEP]])
    with pytest.raises(ValueError, match=r"token id 30527 at row 0, position 2 is outside the vocabulary of 30522"):
        c.mask(ids, np.array([4]), np.array([0]), np.array([0]))


def test_caps_depend_on_the_sample_not_the_batch(monkeypatch):
    # With a cap of 1 per 16 tokens (scaled by 0.6 / 0.15, as the cap follows the rate) against a rate of 0.6, the cap
    # binds; a sample's cap must come from its own length, not the batch's longest.
    monkeypatch.setattr(masking, "PREDICTIONS_PER_TOKEN", 1 / 16)
    c = collator(mlm_probability=0.6)
    samples = make_samples(30)
    idx, epochs = np.arange(30), np.zeros(30, dtype=np.int64)
    together = c(samples, idx, epochs)
    cu = together["cu_seqlens"]
    for j in range(30):
        alone = c([samples[j]], idx[j : j + 1], epochs[j : j + 1])
        assert torch.equal(alone["input_ids"], together["input_ids"][cu[j] : cu[j + 1]])
        cap = max(1, round(len(samples[j].input_ids) * 4 / 16))
        assert (alone["labels"] != -100).sum() == cap
