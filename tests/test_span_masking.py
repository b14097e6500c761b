"""SpanBERT span masking (``masking="span"``) on real text at bert-base-uncased's 30,522-token vocabulary: the C++
masker equals the reference, the spans follow the definition (clipped geometric lengths in whole words, 15% of the
tokens, 80/10/10 per span), and ``fastbert pretrain --masking span`` runs and records it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbert import _wordpiece
from fastbert.data.masking import MASKING_SCHEMES, MaskingCollator

SEED = 5
P, LONGEST = 0.2, 10  # the definition's geometric parameter and clip, restated here rather than imported


class RealRows:
    """[CLS] a [SEP] b [SEP] rows of real English, padded, with what the tests need to read them."""

    def __init__(self, vocab_path: Path, count: int):
        from fastbert.data.corpus import stdlib_documents
        from fastbert.tokenizer import WordPieceTokenizer

        self.tokenizer = tok = WordPieceTokenizer.from_vocab(vocab_path)
        self.vocab = vocab_path.read_text(encoding="utf-8").splitlines()
        paragraphs = [p for doc in stdlib_documents(limit_bytes=600_000) for p in doc]
        encoded = [ids for ids in tok.encode_batch(paragraphs, add_special_tokens=False) if len(ids) >= 8]
        rng = np.random.default_rng(0)
        rows = []
        for k in range(count):
            a, b = encoded[k % len(encoded)], encoded[(k + 1) % len(encoded)]
            # Cut anywhere, so some rows start their second segment with ## pieces.
            la, lb = int(rng.integers(4, 80)), int(rng.integers(1, 45))
            rows.append([tok.cls_token_id, *a[:la], tok.sep_token_id, *b[:lb], tok.sep_token_id])
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self.ids = np.full((count, self.lengths.max()), tok.pad_token_id, dtype=np.int64)
        for i, r in enumerate(rows):
            self.ids[i, : len(r)] = r
        self.samples = np.arange(count, dtype=np.int64) * 7 + 3
        self.epochs = np.zeros(count, dtype=np.int64)
        self.is_piece = np.array([t.startswith("##") for t in self.vocab])
        self.is_special = np.zeros(len(self.vocab), dtype=bool)
        self.is_special[sorted(tok.all_special_ids)] = True

    def collator(self, masking: str = "span", **kw) -> MaskingCollator:
        tok = self.tokenizer
        return MaskingCollator(
            len(self.vocab),
            sorted(tok.all_special_ids),
            tok.mask_token_id,
            seed=SEED,
            masking=masking,
            continuation_ids=np.flatnonzero(self.is_piece).tolist(),
            pad_id=tok.pad_token_id,
            **kw,
        )

    def words(self, i: int) -> list[tuple[int, int]]:
        """Row i's words [begin, end): a maskable token and the maskable ## pieces right after it."""
        row = self.ids[i, : self.lengths[i]]
        maskable = ~self.is_special[row]
        starts = [p for p in range(len(row)) if maskable[p] and (not self.is_piece[row[p]] or not maskable[p - 1])]
        ends = []
        for s in starts:
            e = s + 1
            while e < len(row) and maskable[e] and self.is_piece[row[e]]:
                e += 1
            ends.append(e)
        return list(zip(starts, ends, strict=True))


@pytest.fixture(scope="module")
def real(vocab_path) -> RealRows:
    return RealRows(vocab_path, 4000)


def test_scheme_names_are_one_list():
    assert _wordpiece.MASKING_SCHEMES == MASKING_SCHEMES


@pytest.mark.parametrize("probability,max_predictions", [(0.15, None), (0.4, None), (0.3, 4)])
def test_cpp_span_masking_is_the_reference_on_real_text(real, probability, max_predictions):
    c = real.collator(mlm_probability=probability, max_predictions=max_predictions)
    for start in range(0, 600, 50):
        rows = slice(start, start + 50)
        args = real.ids[rows], real.lengths[rows], real.samples[rows], real.epochs[rows]
        got, expected = c.mask(*args), c.mask_reference(*args)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), start


def test_span_lengths_are_the_clipped_geometric(real):
    c = real.collator()
    spans = c.spans_reference(real.ids, real.lengths, real.samples, real.epochs)
    drawn = np.array([length for row in spans for _, _, length in row])
    k = np.arange(1, LONGEST + 1)
    pmf = P * (1 - P) ** (k - 1) / (1 - (1 - P) ** LONGEST)
    mean = float((k * pmf).sum())
    assert abs(mean - 3.797) < 1e-3  # sum_k k p (1-p)^(k-1) / (1 - (1-p)^10)
    sd = float(np.sqrt((k**2 * pmf).sum() - mean**2))
    assert len(drawn) > 8000
    assert abs(drawn.mean() - mean) < 4 * sd / np.sqrt(len(drawn))
    for length, p in zip(k, pmf, strict=True):
        share = (drawn == length).mean()
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / len(drawn)) + 1e-4, length


def test_spans_take_whole_words_and_are_cut_only_for_a_reason(real):
    """A span covers whole words, at most its drawn number, consecutive and untaken; it is shorter only where the
    next word is taken already, is not right after it (a special token between), or would overshoot the budget."""
    c = real.collator()
    rows = slice(0, 1500)
    spans = c.spans_reference(real.ids[rows], real.lengths[rows], real.samples[rows], real.epochs[rows])
    # Token masking selects exactly the budget, which is the same rule for every scheme.
    token_labels = real.collator("token").mask(
        real.ids[rows], real.lengths[rows], real.samples[rows], real.epochs[rows]
    )[1]
    budgets = (token_labels != -100).sum(1)
    cut = 0
    for i, row_spans in enumerate(spans):
        words = real.words(i)
        word_at = {begin: w for w, (begin, _) in enumerate(words)}
        taken: set[int] = set()
        covered = 0
        for begin, end, drawn in row_spans:
            first = word_at[begin]
            last = first
            while words[last][1] < end:
                last += 1
                assert words[last][0] == words[last - 1][1], (i, begin, end)  # consecutive words
            assert words[last][1] == end and not taken & set(range(first, last + 1)), (i, begin, end)
            taken |= set(range(first, last + 1))
            covered += end - begin
            count = last - first + 1
            assert count <= drawn
            if count < drawn:
                cut += 1
                nxt = last + 1
                assert (
                    nxt == len(words)
                    or words[nxt][0] != end
                    or nxt in taken
                    or covered + words[nxt][1] - words[nxt][0] > budgets[i]
                ), (i, begin, end, drawn)
        assert covered <= budgets[i]
    assert cut > 100  # the cut-short branch was exercised


def test_masked_share_whole_words_and_specials(real):
    c = real.collator()
    masked, labels = c.mask(real.ids, real.lengths, real.samples, real.epochs)
    selected = labels != -100
    real_tokens = np.arange(real.ids.shape[1])[None, :] < real.lengths[:, None]
    maskable = real_tokens & ~real.is_special[real.ids]
    assert not (selected & ~maskable).any()  # never [CLS], [SEP], [PAD]
    assert np.array_equal(masked[~selected], real.ids[~selected])
    assert np.array_equal(labels[selected], real.ids[selected])
    share = selected.sum() / maskable.sum()
    assert 0.14 < share <= 0.15, share
    for i in range(len(real.ids)):
        for begin, end in real.words(i):
            assert selected[i, begin:end].all() or not selected[i, begin:end].any(), (i, begin, end)


def test_each_span_is_replaced_as_a_whole_80_10_10(real):
    c = real.collator()
    masked, _ = c.mask(real.ids, real.lengths, real.samples, real.epochs)
    spans = c.spans_reference(real.ids, real.lengths, real.samples, real.epochs)
    mask_id = real.tokenizer.mask_token_id
    outcomes = {"mask": 0, "random": 0, "kept": 0}
    for i, row_spans in enumerate(spans):
        for begin, end, _ in row_spans:
            out, original = masked[i, begin:end], real.ids[i, begin:end]
            if (out == mask_id).all():
                outcomes["mask"] += 1
            elif np.array_equal(out, original):
                outcomes["kept"] += 1
            else:
                assert not (out == mask_id).any(), (i, begin, end)  # never a span half [MASK]
                assert not real.is_special[out].any()
                outcomes["random"] += 1
    n = sum(outcomes.values())
    for name, p in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        assert abs(outcomes[name] / n - p) < 4 * np.sqrt(p * (1 - p) / n), outcomes


def test_deterministic_per_sample_and_new_each_epoch(real):
    c = real.collator()
    rows = slice(0, 200)
    args = real.ids[rows], real.lengths[rows], real.samples[rows], real.epochs[rows]
    first = c.mask(*args)
    again = real.collator().mask(*args)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    # A sample is masked the same alone as in any batch (any world size or loader worker gives it alone).
    for i in (0, 57, 199):
        alone = c.mask(real.ids[i : i + 1], real.lengths[i : i + 1], real.samples[i : i + 1], real.epochs[i : i + 1])
        assert np.array_equal(alone[0][0], first[0][i]) and np.array_equal(alone[1][0], first[1][i])
    later = c.mask(real.ids[rows], real.lengths[rows], real.samples[rows], real.epochs[rows] + 1)
    changed = (later[1] != first[1]).any(1)
    assert changed.mean() > 0.95


def test_pretrain_masking_span_runs_and_is_recorded(tmp_path, vocab_path):
    from fastbert.data.corpus import stdlib_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(p) for p in stdlib_documents(limit_bytes=20_000)) + "\n")
    data, out = tmp_path / "data", tmp_path / "run"
    fastbert = [sys.executable, "-m", "fastbert"]
    prepare = [*fastbert, "prepare-data", "--vocab", str(vocab_path), "--out", str(data), "--seq-len", "64"]
    result = subprocess.run([*prepare, str(corpus)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    pretrain = [*fastbert, "pretrain", "--data", str(data), "--out", str(out), "--masking", "span", "--steps", "2"]
    batches = ["--global-batch", "4", "--micro-batch", "2", "--warmup", "1", "--no-progress"]
    result = subprocess.run([*pretrain, *batches], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "args.json").read_text())["masking"] == "span"
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2


def test_pretrain_picks_the_collator_scheme(tmp_path):
    from fastbert.train.pretrain import PretrainArgs, masking_collator

    class Shards:
        meta = {"whole_word": True}
        special_ids = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "##b"]
    pick = {
        (masking, flag): masking_collator(
            PretrainArgs(data="d", out="o", masking=masking, whole_word=flag), Shards(), vocab
        ).masking
        for masking in MASKING_SCHEMES
        for flag in (False, True)
    }
    # The shards' meta asks for whole words: token masking becomes whole-word, span stays span.
    assert pick == {(m, f): "span" if m == "span" else "whole-word" for m in MASKING_SCHEMES for f in (False, True)}
    Shards.meta = {}
    assert masking_collator(PretrainArgs(data="d", out="o"), Shards(), vocab).masking == "token"
