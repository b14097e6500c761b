"""The LinMaxMatch matcher against HF's WordPiece model on random vocabularies, its linear step count, and the
generated Unicode tables against a fresh run of their generator."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbert import _wordpiece

tokenizers = pytest.importorskip("tokenizers")

SRC = Path(__file__).resolve().parent.parent / "csrc" / "wordpiece"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build(tokens: list[str], max_chars: int = 100) -> _wordpiece.Tokenizer:
    text = "\n".join(dict.fromkeys(SPECIALS + tokens)).encode()
    vocab = _wordpiece.Vocab.from_text(text, "random-vocab")
    return _wordpiece.Tokenizer(vocab, False, SPECIALS, "[UNK]", "[CLS]", "[SEP]", max_chars)


def hf_word_ids(tokens: list[str], words: list[str], max_chars: int = 100) -> list[list[int]]:
    """HF's WordPiece model alone: every input is one word (no normalizer, no pre-tokenizer)."""
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + tokens))}
    model = tokenizers.Tokenizer(
        tokenizers.models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=max_chars)
    )
    return [e.ids for e in model.encode_batch(words)]


# Short pieces over a tiny alphabet make long overlapping matches, failure chains and unmatchable words common.
piece = st.text(alphabet="abcé中", min_size=1, max_size=6)
vocabularies = st.lists(st.one_of(piece, piece.map(lambda s: "##" + s)), min_size=1, max_size=40)
words = st.lists(st.text(alphabet="abcé中", min_size=1, max_size=40), min_size=1, max_size=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=vocabularies, batch=words)
def test_linmaxmatch_equals_hf_wordpiece_on_random_vocabularies(tokens, batch):
    tokenizer = build(tokens)
    expected = hf_word_ids(tokens, batch)
    for word, ids in zip(batch, expected, strict=True):
        got, ends, _ = tokenizer.match_word(word.encode())
        assert got == ids, (tokens, word)
        greedy, greedy_ends, _ = tokenizer.match_word(word.encode(), greedy=True)
        assert (greedy, greedy_ends) == (got, ends), (tokens, word)
        if ids != [1]:  # the token ends tile the word exactly
            assert ends[-1] == len(word.encode()) and ends == sorted(ends)


@pytest.mark.parametrize("word", ["#", "##", "###", "##a", "a##", "#a", "a#b##c", "####"])
def test_words_holding_the_marker_match_like_hf(word):
    tokens = ["#", "##", "##a", "a", "###", "##b", "##c", "b", "c", "##", "###a"]
    tokenizer = build(tokens)
    assert tokenizer.match_word(word.encode())[0] == hf_word_ids(tokens, [word])[0]


def test_max_chars_per_word_counts_characters_not_bytes():
    tokens = ["é", "##é"]
    tokenizer = build(tokens, max_chars=5)
    for n in (5, 6):
        word = "é" * n
        assert tokenizer.match_word(word.encode())[0] == hf_word_ids(tokens, [word], max_chars=5)[0]


def test_steps_grow_linearly_where_greedy_search_is_quadratic():
    """A vocabulary of runs "a" * k and "##" + "a" * k and words of "a"s ending in an unmatched "b": BERT's greedy
    loop retries every shorter prefix at each position, LinMaxMatch takes a bounded number of steps per byte."""
    tokens = ["a" * k for k in range(1, 65)] + ["##" + "a" * k for k in range(1, 65)] + ["##b"]
    tokenizer = build(tokens, max_chars=1 << 30)
    steps = {}
    for n in (4_000, 8_000, 16_000):
        word = ("a" * (n - 1) + "b").encode()
        ids, ends, steps[n] = tokenizer.match_word(word)
        assert ids == tokenizer.match_word(word, greedy=True)[0]
        assert ends[-1] == n
    assert 1.9 <= steps[8_000] / steps[4_000] <= 2.1
    assert 1.9 <= steps[16_000] / steps[8_000] <= 2.1
    assert steps[16_000] <= 3 * 16_000


def test_real_vocab_trie_matches_hf_on_its_own_tokens(vocab_path):
    """Every token of bert-base-uncased, as a word and glued to its neighbour, through both matchers."""
    vocab = _wordpiece.Vocab.from_file(str(vocab_path))
    tokens = vocab.tokens
    tokenizer = _wordpiece.Tokenizer(vocab, True, SPECIALS, "[UNK]", "[CLS]", "[SEP]")
    batch = [t.removeprefix("##") for t in tokens] + [
        a.removeprefix("##") + b.removeprefix("##") for a, b in zip(tokens[::7], tokens[1::7], strict=False)
    ]
    model = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
    expected = [e.ids for e in model.encode_batch(batch)]
    got = [tokenizer.match_word(w.encode())[0] for w in batch]
    mismatches = [(w, g, e) for w, g, e in zip(batch, got, expected, strict=True) if g != e]
    assert not mismatches, mismatches[:5]


def test_tokenizer_owns_its_vocabulary():
    """The C++ tokenizer keeps a copy of the vocabulary; its lookups must not point into the caller's object."""
    tokenizer = build(["hello", "##s"])
    gc.collect()
    _wordpiece.Vocab.from_text(b"\n".join([b"filler%d" % i for i in range(1000)]), "churn")
    assert tokenizer.vocab.token_to_id("hello") == 5 and tokenizer.vocab.token_to_id("##s") == 6
    assert tokenizer.match_word(b"hellos")[0] == [5, 6]


def test_unicode_tables_regenerate_identically(tmp_path):
    out = tmp_path / "unicode_tables.inc"
    subprocess.run([sys.executable, str(SRC / "gen_unicode_tables.py"), str(out)], check=True, capture_output=True)
    checked_in = (SRC / "unicode_tables.inc").read_text()

    # The header comment names the tokenizers and Python versions it was made with; the tables must not move.
    def tables(text: str) -> str:
        return text[text.index("#pragma once") :]

    assert tables(out.read_text()) == tables(checked_in), (
        "csrc/wordpiece/unicode_tables.inc is stale for the installed tokenizers: rerun gen_unicode_tables.py"
    )
