"""Documents -> sentences -> token ids: blingfire's sentence splitter, the C++ batch encoder, and ``Documents``, the
flat arrays that carry the ids on to the pair cutter.

Encoding runs in the calling process on a thread pool (``encode_documents``), or in worker processes that
``init_worker`` gives a tokenizer of their own; cutting the documents into blocks for the workers and assembling
the results in order is ``fastbert.data.prepare``'s business. Nothing here imports torch, which would cost every worker
seconds and memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

_WORKER_TOKENIZER = None


@dataclass
class Documents:
    """Tokenized documents held flat: sentence ``s`` is ``tokens[sentence_offsets[s]:sentence_offsets[s + 1]]``
    and document ``d`` is sentences ``doc_offsets[d]`` to ``doc_offsets[d + 1]``. No sentence or document is
    empty."""

    tokens: np.ndarray  # int32
    sentence_offsets: np.ndarray  # int64, [num_sentences + 1]
    doc_offsets: np.ndarray  # int64, [num_documents + 1]

    @classmethod
    def empty(cls) -> Documents:
        zero = np.zeros(1, dtype=np.int64)
        return cls(np.zeros(0, dtype=np.int32), zero, zero.copy())

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1

    @classmethod
    def concatenate(cls, parts: Sequence[Documents]) -> Documents:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        token_base = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        sentence_base = np.cumsum([0] + [p.num_sentences for p in parts[:-1]])
        return cls(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([[0]] + [p.sentence_offsets[1:] + t for p, t in zip(parts, token_base, strict=True)]),
            np.concatenate([[0]] + [p.doc_offsets[1:] + s for p, s in zip(parts, sentence_base, strict=True)]),
        )


def split_sentences(document: str) -> list[str]:
    import blingfire

    sentences = [s for s in blingfire.text_to_sentences(document).split("\n") if s.strip()]
    if not sentences and document.strip():
        # blingfire returns "" when it fails; keep the text as one sentence (cut to fit later) rather than lose it
        return [document]
    return sentences


def load_tokenizer(vocab: str, do_lower_case: bool):
    from fastbert.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer.from_vocab(vocab, do_lower_case=do_lower_case)


def init_worker(vocab: str, do_lower_case: bool) -> None:
    """A worker process's initializer: the tokenizer that ``encode_documents`` uses when given none."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(vocab, do_lower_case)


def encode_documents(docs: list[str], tokenizer=None, num_threads: int = 1) -> Documents:
    """Documents -> sentences -> token ids; sentences and documents left with no tokens are dropped (they held only
    characters that tokenization strips).

    With ``num_threads`` > 1 (0: all cores), blocks of documents are split into sentences on a thread pool
    (blingfire's C call releases the GIL) while the calling thread encodes the blocks already split (the C++
    encoder releases it too), so the two stages overlap."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    if threads > 1 and len(docs) > 1:
        step = max(1, min(16, len(docs) // (4 * threads)))  # blocks of documents: few hand-offs, even shares
        with ThreadPoolExecutor(threads) as pool:
            split = pool.map(lambda k: [split_sentences(d) for d in docs[k : k + step]], range(0, len(docs), step))
            parts = [_encode_sentences(block, tokenizer, 1) for block in split]
        return Documents.concatenate(parts)
    return _encode_sentences([split_sentences(d) for d in docs], tokenizer, threads)


def _encode_sentences(sentences: list[list[str]], tokenizer, num_threads: int) -> Documents:
    """Sentences of documents -> Documents, without the sentences and documents that have no tokens."""
    flat = [s for doc in sentences for s in doc]
    if not flat:
        return Documents.empty()
    tokens, offsets = tokenizer.encode_batch_flat(flat, add_special_tokens=False, num_threads=num_threads)
    kept = np.diff(offsets) > 0
    sentence_offsets = np.concatenate([[0], offsets[1:][kept]])
    doc_of_sentence = np.repeat(np.arange(len(sentences)), [len(d) for d in sentences])
    per_doc = np.bincount(doc_of_sentence[kept], minlength=len(sentences))  # sentences with tokens, per document
    doc_offsets = np.concatenate([[0], np.cumsum(per_doc[per_doc > 0])])
    return Documents(tokens, sentence_offsets.astype(np.int64), doc_offsets.astype(np.int64))
