"""Whole-word masking from the command line: ``prepare-data --whole-word`` records it for the shards,
``pretrain --whole-word`` asks for it, and either way every word (its first piece and its ``##`` continuations from
the real bert-base-uncased vocabulary) is predicted whole or not at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbert.data.shards import ShardDataset
from fastbert.train.pretrain import PretrainArgs, masking_collator


def _prepare(tmp_path: Path, vocab_path: Path, *extra: str) -> Path:
    from fastbert.data.corpus import stdlib_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(p) for p in stdlib_documents(limit_bytes=40_000)) + "\n")
    out = tmp_path / "data"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbert",
            "prepare-data",
            "--vocab",
            str(vocab_path),
            "--out",
            str(out),
            "--seq-len",
            "64",
            str(corpus),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _split_words(data: Path, whole_word_flag: bool) -> tuple[int, int]:
    """(words with a continuation that were predicted, of them the ones predicted only in part) over 256 samples."""
    dataset = ShardDataset(data)
    vocab = (data / "vocab.txt").read_text(encoding="utf-8").splitlines()
    collate = masking_collator(PretrainArgs(data=str(data), out="unused", whole_word=whole_word_flag), dataset, vocab)
    indices = np.arange(min(256, len(dataset)))
    batch = collate([dataset[int(i)] for i in indices], indices, np.zeros_like(indices))
    labels, ids = batch["labels"].numpy(), batch["input_ids"].numpy()
    is_piece = np.array([t.startswith("##") for t in vocab])
    is_special = np.zeros(len(vocab), dtype=bool)
    is_special[list(dataset.special_ids.values())] = True
    original = np.where(labels >= 0, labels, ids)  # the unmasked tokens (masked ones are their labels)
    predicted, partial = 0, 0
    bounds = batch["cu_seqlens"].numpy()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        tokens, chosen = original[start:stop], labels[start:stop] >= 0
        word_starts = np.flatnonzero(~is_piece[tokens] | is_special[tokens])  # a piece after [SEP] starts a word
        for begin, end in zip(word_starts, [*word_starts[1:], len(tokens)], strict=True):
            if is_special[tokens[begin]]:
                begin += 1
            if end - begin > 1 and chosen[begin:end].any():
                predicted += 1
                partial += not chosen[begin:end].all()
    return predicted, partial


@pytest.mark.parametrize("where", ["prepare-data", "pretrain"])
def test_whole_word_masking_predicts_whole_words(tmp_path, vocab_path, where):
    data = _prepare(tmp_path, vocab_path, *(["--whole-word"] if where == "prepare-data" else []))
    predicted, partial = _split_words(data, whole_word_flag=where == "pretrain")
    assert predicted > 20 and partial == 0


def test_token_masking_splits_words(tmp_path, vocab_path):
    predicted, partial = _split_words(_prepare(tmp_path, vocab_path), whole_word_flag=False)
    assert predicted > 20 and partial > 0  # so the whole-word test above can fail
