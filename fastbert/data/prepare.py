"""``fastbert prepare-data``: text files -> documents -> sentences -> token ids -> segment pairs -> shards.

Inputs are ``.txt`` (a blank line between documents), ``.jsonl`` (one document per line, in a text field) and
``.parquet`` (a text column), given as files, directories (searched recursively) or glob patterns. Documents are
split into sentences with blingfire, encoded with the C++ batch encoder, and cut into pretraining samples as in the
original BERT recipe: a target length of ``seq_len - 3`` tokens, shorter with probability 0.1; NSP negatives take
segment B from a different document; SOP swaps A and B half the time; ``none`` packs whole sentences up to the
length, RoBERTa-style. Every random choice comes from ``(seed, document index)``, and files are read by workers
but assembled in input order, so the shards are byte-identical for any ``--workers``. Token ids stay in flat
arrays from the encoder to the shards: ``document_pairs`` below defines the pairing recipe, and the C++ extension
runs the same algorithm on those arrays (``fastbert._wordpiece.segment_pairs``).

Bad input is never silently dropped: invalid UTF-8 is an error naming the file and byte offset (or, with
``errors="replace"``, replaced and counted); a malformed JSON line names its file and line; empty files are skipped
and listed in ``meta.json``; tokens cut by BERT's truncation are counted there too.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from fastbert.atomic import replace_directory
from fastbert.config import OBJECTIVES
from fastbert.data.shards import SegmentPair, ShardWriter
from fastbert.data.splitmix import GOLDEN, MASK64, mix64

log = logging.getLogger("fastbert.data")

SUFFIXES = (".txt", ".jsonl", ".parquet")
SHORT_SEQ_PROB = 0.1


class InputError(ValueError):
    """Input text that cannot be read as asked; the message names the file and where. Raised by prepare-data and
    by ``fastbert tokenize``, the two readers of text files."""


@dataclass
class PrepareOptions:
    vocab: str
    do_lower_case: bool = True
    seq_len: int = 128
    objective: str = "nsp"
    seed: int = 0
    workers: int = 1
    errors: str = "strict"
    text_field: str = "text"
    short_seq_prob: float = SHORT_SEQ_PROB
    shard_size: int = 100_000
    whole_word: bool = False  # recorded in meta.json: pretraining on these shards masks whole words by default

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {self.errors!r}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


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

    def to_lists(self) -> list[list[list[int]]]:
        """document -> sentence -> token ids, as Python lists (what ``document_pairs`` takes)."""
        sentences = np.split(self.tokens, self.sentence_offsets[1:-1])
        return [
            [s.tolist() for s in sentences[self.doc_offsets[d] : self.doc_offsets[d + 1]]] for d in range(len(self))
        ]


@dataclass
class FileResult:
    path: str
    documents: Documents
    num_bytes: int
    replaced: int = 0


@dataclass
class PrepareStats:
    files: int = 0
    bytes: int = 0
    documents: int = 0
    sentences: int = 0
    replaced_characters: int = 0
    truncated_tokens: int = 0
    dropped_segments: int = 0
    empty_files: list[str] = field(default_factory=list)


# Finding and reading input -----------------------------------------------------------------------------------------
def input_files(inputs: Sequence[str]) -> list[Path]:
    """Expand files, directories and glob patterns into a sorted, de-duplicated list of input files."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not matches:
                raise InputError(f"{path}: directory holds no {'/'.join(SUFFIXES)} files")
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise InputError(f"{item}: no such file, directory or matching pattern")
        for p in matches:
            if p.suffix not in SUFFIXES:
                raise InputError(f"{p}: unsupported input type {p.suffix!r} (expected {', '.join(SUFFIXES)})")
        found += matches
    return list(dict.fromkeys(found))


def _decode(path: Path, data: bytes, errors: str) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InputError(
                f"{path}: invalid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}); "
                f"fix the file or pass --errors replace"
            ) from None
    text = data.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - data.count("\ufffd".encode())


def read_documents(path: Path, errors: str = "strict", text_field: str = "text") -> tuple[list[str], int, int]:
    """The documents of one input file, its size in bytes and the number of replaced characters."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
        docs = [t for t in table.column(text_field).to_pylist() if t is not None and t.strip()]
        return docs, path.stat().st_size, 0
    data = path.read_bytes()
    text, replaced = _decode(path, data, errors)
    if path.suffix == ".jsonl":
        docs = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
            if not isinstance(record, dict) or text_field not in record:
                raise InputError(f"{path}:{line_no}: no field {text_field!r}")
            if not isinstance(record[text_field], str):
                raise InputError(
                    f"{path}:{line_no}: field {text_field!r} is {type(record[text_field]).__name__}, not a string"
                )
            if record[text_field].strip():
                docs.append(record[text_field])
        return docs, len(data), replaced
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs, len(data), replaced


def split_sentences(document: str) -> list[str]:
    import blingfire

    sentences = [s for s in blingfire.text_to_sentences(document).split("\n") if s.strip()]
    if not sentences and document.strip():
        # blingfire returns "" when it fails; keep the text as one sentence (cut to fit later) rather than lose it
        return [document]
    return sentences


_WORKER_TOKENIZER = None
DOCUMENTS_PER_TASK = 64  # a worker's unit of work: enough to amortise the hand-off, small enough to balance
PAIR_BLOCK = 20_000  # documents cut into samples per call, between progress updates


def _load_tokenizer(vocab: str, do_lower_case: bool):
    from fastbert.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer.from_vocab(vocab, do_lower_case=do_lower_case)


def _init_worker(vocab: str, do_lower_case: bool) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer(vocab, do_lower_case)


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


def encoded_files(files: list[Path], options: PrepareOptions, tokenizer) -> Iterator[FileResult]:
    """Every file's encoded documents, in input order. Files are read here; with ``workers > 1`` their documents
    are split and encoded in blocks by worker processes and reassembled in order."""
    pool = None
    if options.workers > 1:
        # fork: workers start at once and only run the tokenizer and blingfire, never torch
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = ctx.Pool(options.workers, initializer=_init_worker, initargs=(options.vocab, options.do_lower_case))
    try:
        for path in files:
            docs, size, replaced = read_documents(path, options.errors, options.text_field)
            if pool is None:
                encoded = encode_documents(docs, tokenizer, num_threads=0)
            else:
                blocks = [docs[k : k + DOCUMENTS_PER_TASK] for k in range(0, len(docs), DOCUMENTS_PER_TASK)]
                encoded = Documents.concatenate(list(pool.imap(encode_documents, blocks)))
            yield FileResult(str(path), encoded, size, replaced)
    finally:
        if pool is not None:
            pool.terminate()


# Segment pairs -----------------------------------------------------------------------------------------------------
# The functions here are the readable definition of the recipe; prepare() runs the same algorithm in C++
# (csrc/wordpiece/pairs.cc, fastbert._wordpiece.segment_pairs) and a test holds the two to identical samples.
class PairRandom:
    """A document's random stream: SplitMix64 seeded from (seed, document index)."""

    def __init__(self, seed: int, stream: int):
        self.state = mix64(mix64((seed + GOLDEN) & MASK64) ^ stream)

    def uniform(self) -> float:
        """A float in [0, 1) with 53 random bits."""
        self.state = (self.state + GOLDEN) & MASK64
        return (mix64(self.state) >> 11) * 2.0**-53

    def randint(self, low: int, high: int) -> int:
        """An int in [low, high), from one uniform draw."""
        return low + int(self.uniform() * (high - low))


def _truncate_pair(a: list[int], b: list[int], limit: int, rng: PairRandom) -> int:
    """BERT's truncation: trim the longer segment (B on a tie) one token at a time, from the front or the back at
    random; returns tokens cut."""
    excess = len(a) + len(b) - limit
    if excess <= 0:
        return 0
    a0, a1, b0, b1 = 0, len(a), 0, len(b)
    for _ in range(excess):
        front = rng.uniform() < 0.5
        if a1 - a0 > b1 - b0:
            a0, a1 = (a0 + 1, a1) if front else (a0, a1 - 1)
        else:
            b0, b1 = (b0 + 1, b1) if front else (b0, b1 - 1)
    a[:], b[:] = a[a0:a1], b[b0:b1]
    return excess


def document_pairs(
    index: int, documents: list[list[list[int]]], options: PrepareOptions, stats: PrepareStats
) -> list[SegmentPair]:
    """The samples cut from ``documents[index]``; randomness from ``(seed, index)`` only."""
    rng = PairRandom(options.seed, index)
    doc = documents[index]
    if options.objective == "none":
        return _packed(doc, options.seq_len - 2)
    max_tokens = options.seq_len - 3
    # A "sentence" too long for half a sample (a list, a table, unpunctuated prose) is cut into pieces that fit,
    # rather than left to truncation, which would throw most of it away.
    piece = max(1, max_tokens // 2)
    if any(len(s) > piece for s in doc):
        doc = [s[k : k + piece] for s in doc for k in range(0, len(s), piece)]
    pairs: list[SegmentPair] = []
    uniform, randint = rng.uniform, rng.randint

    def draw_target() -> int:
        return randint(2, max_tokens + 1) if uniform() < options.short_seq_prob else max_tokens

    target, chunk, length, i = draw_target(), [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = randint(1, len(chunk)) if len(chunk) >= 2 else 1
            a = list(chain.from_iterable(chunk[:a_end]))
            # Unlike the original recipe, a one-sentence chunk is not forced to be a negative (it is split below
            # when it must be a positive), so IsNext stays at 50% however short the documents are.
            if options.objective == "nsp" and uniform() < 0.5:
                label, b = 0, []
                other = randint(0, len(documents) - 1)
                other += other >= index
                src = documents[other]
                start = randint(0, len(src))
                for s in src[start:]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next sample
            else:
                b = list(chain.from_iterable(chunk[a_end:]))
                if not b and len(a) >= 2:  # one sentence: split it so that it still makes an A/B pair
                    cut = randint(1, len(a))
                    a, b = a[:cut], a[cut:]
                label = 1
                if options.objective == "sop" and uniform() < 0.5:
                    a, b, label = b, a, 0
            stats.truncated_tokens += _truncate_pair(a, b, max_tokens, rng)
            if a and b:
                pairs.append(SegmentPair(a, b, label))
            else:
                stats.dropped_segments += 1
            target, chunk, length = draw_target(), [], 0
        i += 1
    return pairs


def _packed(doc: list[list[int]], limit: int) -> list[SegmentPair]:
    """Whole sentences packed up to ``limit`` tokens; a sentence longer than that spans several samples."""
    pairs, current = [], []
    for sentence in doc:
        if current and len(current) + len(sentence) > limit:
            pairs.append(SegmentPair(current, [], -1))
            current = []
        current = current + sentence
        while len(current) > limit:
            pairs.append(SegmentPair(current[:limit], [], -1))
            current = current[limit:]
    if current:
        pairs.append(SegmentPair(current, [], -1))
    return pairs


# The job -----------------------------------------------------------------------------------------------------------
def prepare(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    options: PrepareOptions,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run the whole pipeline; returns the written ``meta.json`` contents.

    The shards are written into a temporary directory beside ``out_dir`` and renamed into place at the end, so a
    failed or interrupted run leaves nothing that looks prepared, and an earlier, larger run's shards never linger
    among the new ones. A non-empty ``out_dir`` is refused unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        held = sorted(p.name for p in out_dir.iterdir())
        raise InputError(
            f"--out {out_dir} is not empty (it holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
            "pass --overwrite to replace it, or choose another directory"
        )
    files = input_files(inputs)
    tokenizer = _load_tokenizer(options.vocab, options.do_lower_case)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        meta = _prepare_into(partial, files, tokenizer, options, progress)
        replace_directory(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info(
        "wrote %d samples (%d tokens) in %d shard(s) to %s",
        meta["num_samples"],
        meta["num_tokens"],
        len(meta["shards"]),
        out_dir,
    )
    return meta


def _prepare_into(out_dir: Path, files: list[Path], tokenizer, options: PrepareOptions, progress: bool) -> dict:
    from tqdm import tqdm

    stats = PrepareStats(files=len(files))
    parts: list[Documents] = []
    total_bytes = sum(p.stat().st_size for p in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encode", disable=not progress) as bar:
        for result in encoded_files(files, options, tokenizer):
            bar.update(result.num_bytes)
            stats.bytes += result.num_bytes
            stats.replaced_characters += result.replaced
            if result.replaced:
                log.warning("%s: replaced %d invalid UTF-8 sequence(s)", result.path, result.replaced)
            if not len(result.documents):
                log.warning("%s: no text; skipped", result.path)
                stats.empty_files.append(result.path)
            parts.append(result.documents)
    documents = Documents.concatenate(parts)
    del parts
    stats.documents = len(documents)
    stats.sentences = documents.num_sentences
    if not len(documents):
        raise InputError(f"no text in any input ({len(files)} file(s) read)")
    if options.objective == "nsp" and len(documents) < 2:
        raise InputError(
            "NSP needs at least two documents to draw negatives from (separate documents in .txt "
            "files with a blank line)"
        )
    vocab = tokenizer.vocab.tokens
    special = {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }
    tokenizer.save_pretrained(out_dir)  # the vocabulary travels with the shards it encoded
    writer = ShardWriter(
        out_dir,
        vocab_tokens=vocab,
        special_ids=special,
        seq_len=options.seq_len,
        objective=options.objective,
        seed=options.seed,
        shard_size=options.shard_size,
        extra_meta={"do_lower_case": options.do_lower_case, "whole_word": options.whole_word},
    )
    from fastbert import _wordpiece

    with tqdm(total=len(documents), desc="pairs", unit="doc", disable=not progress) as bar:
        for begin in range(0, len(documents), PAIR_BLOCK):
            end = min(len(documents), begin + PAIR_BLOCK)
            tokens, offsets, split, labels, truncated, dropped = _wordpiece.segment_pairs(
                documents.tokens,
                documents.sentence_offsets,
                documents.doc_offsets,
                begin,
                end,
                options.seq_len,
                options.objective,
                options.short_seq_prob,
                options.seed,
            )
            writer.add_samples(tokens, offsets, split, labels)
            stats.truncated_tokens += truncated
            stats.dropped_segments += dropped
            bar.update(end - begin)
    return writer.close(stats={k: v for k, v in vars(stats).items()})
