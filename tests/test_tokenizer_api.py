"""WordPieceTokenizer's Python API against transformers' BertTokenizerFast: __call__ with truncation, padding,
tensors and offsets; loading and saving; decoding; id conversion; threads and the GIL; bad input named precisely.
Ends with the hypothesis property test: random Unicode text gives HF fast's ids, cased and uncased, with and
without pairs and truncation."""

from __future__ import annotations

import json
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbert.tokenizer import VocabError, WordPieceTokenizer

transformers = pytest.importorskip("transformers")


def reference(directory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertTokenizerFast.from_pretrained(str(directory), **kwargs)


@pytest.fixture(scope="module")
def ours(minilm_dir) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_pretrained(minilm_dir)


def as_lists(encoding) -> dict:
    out = {}
    for key, value in dict(encoding).items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if key == "offset_mapping":
            value = (
                [[tuple(o) for o in row] for row in value]
                if value and isinstance(value[0], list)
                else [tuple(o) for o in value]
            )
        out[key] = value
    return out


CALLS = [
    {},
    {"truncation": True, "max_length": 12},
    {"truncation": "longest_first", "max_length": 9},
    {"truncation": "only_first", "max_length": 100},
    {"truncation": True},
    {"padding": True},
    {"padding": "longest", "pad_to_multiple_of": 8},
    {"padding": "max_length", "max_length": 64, "truncation": True},
    {"padding": "max_length", "max_length": 15, "truncation": True, "pad_to_multiple_of": 5},
    {"padding": True, "max_length": 12, "truncation": True, "pad_to_multiple_of": 4},
    {"padding": True, "return_tensors": "np"},
    {"padding": True, "truncation": True, "max_length": 10, "return_tensors": "pt"},
    {"add_special_tokens": False, "padding": True},
    {"add_special_tokens": False, "truncation": True, "max_length": 5},
]


@pytest.mark.parametrize("kwargs", CALLS, ids=[json.dumps(c) for c in CALLS])
@pytest.mark.parametrize("with_pairs", [False, True])
def test_call_matches_transformers(ours, hf_tokenizer, real_sentences, kwargs, with_pairs):
    texts = real_sentences[:12]
    pairs = real_sentences[-12:][::-1] if with_pairs else None
    got = ours(texts, pairs, return_offsets_mapping=True, **kwargs)
    expected = hf_tokenizer(texts, pairs, return_offsets_mapping=True, **kwargs)
    assert set(got) == {"input_ids", "token_type_ids", "attention_mask", "offset_mapping"}
    if "return_tensors" in kwargs:
        kind = np.ndarray if kwargs["return_tensors"] == "np" else torch.Tensor
        assert all(isinstance(v, kind) and v.dtype in (np.int64, torch.int64) for v in got.values())
        assert got["offset_mapping"].shape == (len(texts), got["input_ids"].shape[1], 2)
    assert as_lists(got) == as_lists(expected)


def test_only_second_truncation_matches_transformers(ours, hf_tokenizer, real_sentences):
    texts, pairs = real_sentences[:6], real_sentences[6:12]
    got = ours(texts, pairs, truncation="only_second", max_length=100, return_offsets_mapping=True)
    assert as_lists(got) == as_lists(
        hf_tokenizer(texts, pairs, truncation="only_second", max_length=100, return_offsets_mapping=True)
    )


def test_single_string_call(ours, hf_tokenizer):
    text, pair = "Hello there, General Kenobi!", "A surprise, to be sure."
    for kwargs in ({}, {"truncation": True, "max_length": 7}, {"padding": "max_length", "max_length": 20}):
        assert as_lists(ours(text, pair, return_offsets_mapping=True, **kwargs)) == as_lists(
            hf_tokenizer(text, pair, return_offsets_mapping=True, **kwargs)
        )
    got, expected = ours(text, return_tensors="pt"), hf_tokenizer(text, return_tensors="pt")
    assert got["input_ids"].shape == (1, 10) and torch.equal(got["input_ids"], expected["input_ids"])


@pytest.mark.parametrize("max_length", [0, 1, 2, 3, 4])
def test_max_length_below_the_special_tokens(ours, hf_tokenizer, max_length):
    texts, pairs = ["Hello there, General Kenobi!", "short"], ["b c d e f", "g"]
    for p in (None, pairs):
        assert (
            ours(texts, p, truncation=True, max_length=max_length)["input_ids"]
            == hf_tokenizer(texts, p, truncation=True, max_length=max_length)["input_ids"]
        )


def test_impossible_truncation_is_an_error_in_both(ours, hf_tokenizer):
    texts, pairs = ["a b c d e f g"], ["x y z w"]
    for kwargs, message in (
        ({"truncation": "only_first", "max_length": 6}, r"texts\[0\]: truncation='only_first'"),
        ({"truncation": "only_second", "max_length": 8}, r"truncation='only_second' needs pairs"),
    ):
        use_pairs = pairs if kwargs["truncation"] == "only_first" else None
        with pytest.raises(Exception, match="Truncation error"):
            hf_tokenizer(texts, use_pairs, **kwargs)
        with pytest.raises(ValueError, match=message):
            ours(texts, use_pairs, **kwargs)


def test_truncation_length_must_be_a_multiple_of_the_padding_multiple(ours, hf_tokenizer):
    kwargs = {"padding": True, "truncation": True, "max_length": 10, "pad_to_multiple_of": 4}
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple_of"):
        hf_tokenizer(["a b"], **kwargs)
    with pytest.raises(ValueError, match=r"max_length=10 would be padded past .* pad_to_multiple_of=4"):
        ours(["a b"], **kwargs)


def test_ragged_tensors_are_refused(ours):
    with pytest.raises(ValueError, match=r"return_tensors='np' needs rows of one length, got lengths \[3, 5\]"):
        ours(["a", "a b c"], return_tensors="np")


def test_encode_tokenize_and_batch(ours, hf_tokenizer, real_sentences):
    for text in real_sentences[:10]:
        assert ours.encode(text) == hf_tokenizer.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)
        assert ours.tokenize(text) == hf_tokenizer.tokenize(text)
    a, b = real_sentences[0], real_sentences[1]
    assert ours.encode(a, b) == hf_tokenizer(a, b)["input_ids"]
    firsts, seconds = real_sentences * 4, real_sentences[::-1] * 4  # enough items for several threads' chunks
    expected = hf_tokenizer(firsts, seconds)["input_ids"]
    for threads in (None, 1, 2, 7):
        assert ours.encode_batch(firsts, seconds, num_threads=threads) == expected
    assert (
        ours.encode_batch(tuple(real_sentences[:3]), add_special_tokens=False)
        == hf_tokenizer(real_sentences[:3], add_special_tokens=False)["input_ids"]
    )
    assert ours.encode_batch([]) == []


def test_decode_matches_transformers(ours, hf_tokenizer, real_sentences):
    texts = real_sentences[:10] + ["Isn't it naïve? [MASK] ... he'll, they're! 3.14 ##ing", ""]
    for text in texts:
        ids = hf_tokenizer(text)["input_ids"]
        assert ours.decode(ids) == hf_tokenizer.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    batch = hf_tokenizer(texts)["input_ids"]
    assert ours.batch_decode(batch) == hf_tokenizer.batch_decode(batch)


def test_id_conversion(ours, hf_tokenizer):
    tokens = ["hello", "##ing", "[MASK]", "no-such-token", "[UNK]"]
    assert ours.convert_tokens_to_ids(tokens) == hf_tokenizer.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("hello") == hf_tokenizer.convert_tokens_to_ids("hello")
    ids = [0, 100, 101, 102, 103, 2023, 30521]
    assert ours.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(7592) == "hello"
    assert ours.get_vocab() == hf_tokenizer.get_vocab()
    assert len(ours) == ours.vocab_size == 30522
    with pytest.raises(IndexError, match=r"token id 30522 is outside the vocabulary"):
        ours.convert_ids_to_tokens([5, 30522])


def test_save_and_load_round_trip_with_transformers(ours, tmp_path, real_sentences):
    paths = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in paths) == ["tokenizer_config.json", "vocab.txt"]
    again = WordPieceTokenizer.from_pretrained(tmp_path / "saved")
    hf = reference(tmp_path / "saved")
    assert again.encode_batch(real_sentences) == ours.encode_batch(real_sentences) == hf(real_sentences)["input_ids"]
    cased = WordPieceTokenizer.from_vocab(tmp_path / "saved" / "vocab.txt", do_lower_case=False)
    cased.save_pretrained(tmp_path / "cased")
    assert not WordPieceTokenizer.from_pretrained(tmp_path / "cased").do_lower_case
    text = "Hello World, Café"
    assert cased.encode(text) == reference(tmp_path / "cased")(text)["input_ids"] != ours.encode(text)


def test_custom_special_tokens(tmp_path):
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\n<s>\n</s>\n<mask>\nhello\n##s\nworld\n")
    tokenizer = WordPieceTokenizer.from_vocab(
        tmp_path / "vocab.txt",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
    )
    assert tokenizer.encode("hellos <mask>world x") == [2, 5, 6, 4, 7, 1, 3]


def test_utf8_bytes_items_encode_like_their_text(ours, real_sentences):
    texts = real_sentences[:5] + ["naïve café 中文 😀"]
    assert ours.encode_batch([t.encode() for t in texts]) == ours.encode_batch(texts)
    got = ours([t.encode() for t in texts], return_offsets_mapping=True)
    assert got == ours(texts, return_offsets_mapping=True)  # offsets count characters either way


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_batches_equal_one_text_at_a_time(ours, real_sentences, threads):
    # Odd sizes and mixed lengths, so chunks end mid-batch and threads finish out of order.
    texts = [s * (1 + i % 7) for i, s in enumerate(real_sentences * 5)][:1237] + ["", "x"]
    expected = [ours.encode(t) for t in texts]
    assert ours.encode_batch(texts, num_threads=threads) == expected
    flat, offsets = ours.encode_batch_flat(texts, num_threads=threads)
    assert flat.dtype == np.int32 and offsets.dtype == np.int64 and len(offsets) == len(texts) + 1
    assert [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))] == expected
    pairs = texts[::-1]
    expected_pairs = [ours.encode(a, b) for a, b in zip(texts, pairs, strict=True)]
    assert ours.encode_batch(texts, pairs, num_threads=threads) == expected_pairs


def test_gil_is_released_during_batch_encoding(ours, real_sentences):
    texts = real_sentences * 100
    while True:  # a batch long enough to tell on this machine, however busy: at least 0.1 s on one C++ thread
        started = time.perf_counter()
        ours.encode_batch(texts, num_threads=1)
        if time.perf_counter() - started >= 0.1:
            break
        texts = texts * 2
    inside = threading.Event()
    done = threading.Event()

    def work():
        inside.set()
        ours.encode_batch(texts, num_threads=1)
        done.set()

    thread = threading.Thread(target=work)
    started = time.perf_counter()
    thread.start()
    inside.wait()
    spins = 0
    while not done.is_set():
        spins += 1
    thread.join()
    elapsed = time.perf_counter() - started
    assert elapsed > 0.05, "the batch is too small to tell"
    # Holding the GIL would leave this loop a switch interval (5 ms) at most; without it, it spins all along.
    assert spins > 20_000, (spins, elapsed)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, r"missing\.txt: cannot open vocabulary file"),
        (
            b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nhello\n",
            r"v\.txt:7: duplicate token 'hello' \(first on line 6\)",
        ),
        (b"", r"v\.txt: the vocabulary is empty"),
        (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\ncaf\xc3\n", r"v\.txt:5: invalid UTF-8 at byte 3"),
        (b"[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n", r"v\.txt: the vocabulary has no unk_token '\[UNK\]'"),
        (b"[PAD]\n[UNK]\n[SEP]\n[MASK]\nhello\n", r"v\.txt: the vocabulary has no cls_token '\[CLS\]'"),
        (b"[PAD]\n[UNK]\n[CLS]\n[MASK]\nhello\n", r"v\.txt: the vocabulary has no sep_token '\[SEP\]'"),
        (b"[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n", r"v\.txt: the vocabulary has no pad_token '\[PAD\]'"),
        (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", r"v\.txt: the vocabulary has no mask_token '\[MASK\]'"),
    ],
)
def test_bad_vocabularies_are_named(tmp_path, content, message):
    path = tmp_path / ("missing.txt" if content is None else "v.txt")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VocabError, match=message):
        WordPieceTokenizer.from_vocab(path)


def test_bad_config_is_named(tmp_path, vocab_path):
    (tmp_path / "vocab.txt").write_bytes(vocab_path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true,\n "x": }')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json:2: invalid JSON"):
        WordPieceTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true, "strip_accents": false}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: strip_accents=False"):
        WordPieceTokenizer.from_pretrained(tmp_path)


def test_bad_items_are_named(ours, hf_tokenizer):
    with pytest.raises(TypeError, match=r"texts\[2\] is int, not str"):
        ours.encode_batch(["a", "b", 3])
    with pytest.raises(TypeError, match=r"pairs\[0\] is float, not str or bytes"):
        ours(["a"], [1.5])
    with pytest.raises(TypeError, match=r"texts must be a sequence of str, not a single str"):
        ours.encode_batch("abc")
    with pytest.raises(TypeError, match=r"texts must be a sequence of str, not a single bytes"):
        ours.encode_batch(b"abc")
    with pytest.raises(ValueError, match=r"texts\[1\]: invalid UTF-8 at byte 3"):
        ours.encode_batch([b"fine", b"caf\xc3 au lait"])
    with pytest.raises(ValueError, match=r"pairs\[0\]: invalid UTF-8 at byte 0"):
        ours(["a"], [b"\xed\xa0\x80 surrogate"])
    # A lone surrogate is not text: HF refuses it too (with a TypeError), we name the item and the character.
    with pytest.raises(TypeError):
        hf_tokenizer(["ok", "ab\ud800c"])
    with pytest.raises(ValueError, match=r"texts\[1\]: lone surrogate U\+D800 at character 2"):
        ours.encode_batch(["ok", "ab\ud800c"])
    with pytest.raises(ValueError, match=r"^text: lone surrogate U\+DFFF at character 0"):
        ours.encode("\udfff")
    with pytest.raises(TypeError, match=r"^text is NoneType, not str"):
        ours.tokenize(None)
    with pytest.raises(ValueError, match="pairs has 1 items but texts has 2"):
        ours.encode_batch(["a", "b"], ["c"])


# The hypothesis property test.

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60)
english_ish = st.lists(
    st.sampled_from(
        list("abcdefghij ABCDE.,'!#[]-éñ中ß\u0301\t\n")
        + ["[CLS]", "[SEP]", "[MASK]", "the ", "ing ", "Straße ", "naïve", "\x00", "\u200d", "😀"]
    ),
    max_size=30,
).map("".join)
some_text = texts | english_ish | st.lists(english_ish | texts, max_size=4).map("".join)


@pytest.fixture(scope="module")
def both_casings(minilm_dir, vocab_path):
    return {
        lower: (
            WordPieceTokenizer.from_vocab(vocab_path, do_lower_case=lower),
            reference(minilm_dir, do_lower_case=lower),
        )
        for lower in (True, False)
    }


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(some_text, min_size=1, max_size=4),
    pairs=st.none() | st.lists(some_text, min_size=4, max_size=4),
    lowercase=st.booleans(),
    truncation=st.sampled_from([False, "longest_first", "only_first", "only_second"]),
    max_length=st.integers(3, 40),
)
def test_random_unicode_matches_hf_fast(both_casings, batch, pairs, lowercase, truncation, max_length):
    ours, hf = both_casings[lowercase]
    if pairs is not None:
        pairs = pairs[: len(batch)]
    kwargs = {"return_offsets_mapping": True}
    if truncation:
        kwargs.update(truncation=truncation, max_length=max_length)
    try:
        expected = hf(batch, pairs, **kwargs)
    except Exception as e:  # HF refuses impossible truncations; so must we
        assert "Truncation error" in str(e)
        with pytest.raises(ValueError, match="truncation="):
            ours(batch, pairs, **kwargs)
        return
    assert as_lists(ours(batch, pairs, **kwargs)) == as_lists(expected)


class _CpuDeviceTrie:
    """Stands in for ``_wordpiece.DeviceTrie`` without a GPU: the same per-word ``match_word`` the kernel runs,
    with the kernel's output layout (a word's ids from its first byte offset)."""

    def __init__(self, core):
        self.core = core

    def match(self, words: bytes, ends):
        ids, counts, start = np.zeros(len(words), np.int32), [], 0
        for end in ends:
            got = self.core.match_word(words[start:end])[0]
            ids[start : start + len(got)] = got
            counts.append(len(got))
            start = end
        return ids, np.array(counts, np.int32)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_the_gpu_encode_path_assembles_the_cpu_ids(monkeypatch, vocab_path, real_sentences, add_special_tokens):
    """encode_batch_flat(device="cuda") splits on the CPU, matches on the GPU and assembles the ids; with the
    kernel's matching stood in for on the CPU, the assembly must give the CPU encoder's ids and offsets."""
    import contextlib

    import torch

    from fastbert import _wordpiece

    tokenizer = WordPieceTokenizer.from_vocab(vocab_path)
    monkeypatch.setattr(_wordpiece, "with_cuda", True)
    monkeypatch.setattr(_wordpiece, "DeviceTrie", _CpuDeviceTrie, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    texts = ["", "Hello [MASK] world!", "", "naïve café 中文", *real_sentences[:50], "[CLS] only [SEP]", ""]
    ids, offsets = tokenizer._encode_on_gpu(texts, add_special_tokens, torch.device("cuda", 0))
    want_ids, want_offsets = tokenizer.encode_batch_flat(texts, add_special_tokens)
    np.testing.assert_array_equal(offsets, want_offsets)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.dtype == want_ids.dtype and offsets.dtype == want_offsets.dtype
    assert list(tokenizer._device_tries) == [0]  # uploaded once, then reused
    tokenizer._encode_on_gpu(texts[:3], add_special_tokens, torch.device("cuda", 0))
    assert len(tokenizer._device_tries) == 1


def test_encode_batch_flat_on_a_device_returns_tensors(vocab_path):
    import torch

    tokenizer = WordPieceTokenizer.from_vocab(vocab_path)
    ids, offsets = tokenizer.encode_batch_flat(["a b", "c"], device="cpu")
    want_ids, want_offsets = tokenizer.encode_batch_flat(["a b", "c"])
    assert torch.equal(ids, torch.from_numpy(want_ids)) and torch.equal(offsets, torch.from_numpy(want_offsets))
