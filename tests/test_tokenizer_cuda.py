"""The CUDA batch path: words split on the CPU, then matched by matcher.h's match_word, the function the kernel
runs per word. On the CPU the same two steps must give encode's ids (this is what proves the kernel's logic
here); where nvcc is installed the extension must have been built with the kernel, and where a GPU is present
the kernel's ids must equal the CPU's."""

from __future__ import annotations

import os
import shutil

import pytest

from fastbert import _wordpiece
from fastbert.tokenizer import WordPieceTokenizer

pytestmark = pytest.mark.gpu  # the kernel compiles everywhere nvcc is, but runs only on a CUDA device

TEXTS = [
    "Hello, World! Unaffable naïve café [MASK] ab[SEP]cd 中文字 ΟΔΟΣ İstanbul",
    "emoji 😀 👨‍👩‍👧 ZWJ, Thai ภาษาไทย, Arabic العربية, controls\x00\x07 and \u200b format",
    "x" * 101 + " " + "supercalifragilisticexpialidocious " * 3,
    "",
]


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def tokenizer(request, vocab_path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_vocab(vocab_path, do_lower_case=request.param)


def words_then_match(tokenizer: WordPieceTokenizer, text: str) -> list[int]:
    words, ends, specials = tokenizer._core.split_words(text)
    ids, start = [], 0
    for end, special in zip(ends, specials, strict=True):
        ids += [special] if special >= 0 else tokenizer._core.match_word(words[start:end])[0]
        start = end
    return ids


def test_split_then_match_equals_encode(tokenizer, real_sentences):
    for text in TEXTS + real_sentences:
        assert words_then_match(tokenizer, text) == tokenizer.encode(text, add_special_tokens=False), text


def test_nvcc_present_means_the_kernel_is_built():
    if shutil.which("nvcc") is None or os.environ.get("FASTBERT_CUDA") == "0":
        pytest.skip("nvcc is not installed (or FASTBERT_CUDA=0): the CUDA kernel is not built here")
    assert _wordpiece.with_cuda, "nvcc is on PATH but fastbert._wordpiece was built without the CUDA kernel"
    assert hasattr(_wordpiece.Tokenizer, "match_words_cuda")


def test_kernel_matches_cpu(tokenizer, real_sentences):
    if not _wordpiece.with_cuda:
        pytest.skip("fastbert._wordpiece was built without CUDA")
    torch = pytest.importorskip("torch")
    text = " ".join(TEXTS + real_sentences)
    words, ends, specials = tokenizer._core.split_words(text)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA|cuda"):
            tokenizer._core.match_words_cuda(words, ends)
        pytest.skip("no CUDA device: the kernel compiled, but cannot run here")
    per_word = tokenizer._core.match_words_cuda(words, ends)
    start = 0
    for end, special, ids in zip(ends, specials, per_word, strict=True):
        if special < 0:
            assert ids == tokenizer._core.match_word(words[start:end])[0]
        start = end


def test_encode_batch_flat_on_the_gpu_equals_the_cpu(tokenizer, real_sentences):
    torch = pytest.importorskip("torch")
    if not (_wordpiece.with_cuda and torch.cuda.is_available()):
        pytest.skip("needs the CUDA kernel and a CUDA device")
    texts = TEXTS + real_sentences
    for add in (True, False):
        ids, offsets = tokenizer.encode_batch_flat(texts, add_special_tokens=add, device="cuda")
        assert ids.is_cuda and offsets.is_cuda
        want_ids, want_offsets = tokenizer.encode_batch_flat(texts, add_special_tokens=add)
        assert ids.cpu().numpy().tolist() == want_ids.tolist()
        assert offsets.cpu().numpy().tolist() == want_offsets.tolist()
    assert len(tokenizer._device_tries) == 1  # the trie went up once for both calls
