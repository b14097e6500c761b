"""``fastbert prepare-data``: text files -> documents -> sentences -> token ids -> segment pairs -> shards.

This module runs the job: it checks the options and the output directory, reads the inputs in order
(``fastbert.data.readers``), has them split into sentences and encoded (``fastbert.data.encoding``), in worker
processes with ``--workers``, cuts the documents into pretraining samples with the C++ pair cutter
(``fastbert._wordpiece.segment_pairs``) and writes the shards (``fastbert.data.shards``).

Samples are cut as in the original BERT recipe: a target length of ``seq_len - 3`` tokens, shorter with
probability 0.1; NSP negatives take segment B from a different document; SOP swaps A and B half the time; ``none``
packs whole sentences up to the length, RoBERTa-style. Every random choice comes from ``(seed, document index)``,
and documents are encoded by workers but assembled in input order, so the shards are byte-identical for any
``--workers``. Token ids stay in flat arrays from the encoder to the shards. The readable definition of the recipe
is the Python reference in tests/pairing_reference.py, which the tests hold the C++ cutter to.

Empty files are skipped and listed in ``meta.json``; tokens cut by BERT's truncation are counted there too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastbert.atomic import replace_directory
from fastbert.config import OBJECTIVES
from fastbert.data.encoding import Documents, encode_documents, init_worker, load_tokenizer
from fastbert.data.readers import InputError, input_files, read_documents
from fastbert.data.shards import ShardWriter

log = logging.getLogger("fastbert.data")

SHORT_SEQ_PROB = 0.1
DOCUMENTS_PER_TASK = 64  # a worker's unit of work: enough to amortise the hand-off, small enough to balance
PAIR_BLOCK = 20_000  # documents cut into samples per call, between progress updates


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


def encoded_files(files: list[Path], options: PrepareOptions, tokenizer) -> Iterator[FileResult]:
    """Every file's encoded documents, in input order. Files are read here; with ``workers > 1`` their documents
    are split and encoded in blocks by worker processes and reassembled in order."""
    pool = None
    if options.workers > 1:
        # fork: workers start at once and only run the tokenizer and blingfire, never torch
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = ctx.Pool(options.workers, initializer=init_worker, initargs=(options.vocab, options.do_lower_case))
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
    tokenizer = load_tokenizer(options.vocab, options.do_lower_case)
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
    stats = PrepareStats(files=len(files))
    documents = _encode_inputs(files, tokenizer, options, stats, progress)
    _check_documents(documents, files, options)
    tokenizer.save_pretrained(out_dir)  # the vocabulary travels with the shards it encoded
    writer = _shard_writer(out_dir, tokenizer, options)
    _write_segment_pairs(documents, writer, options, stats, progress)
    return writer.close(stats={k: v for k, v in vars(stats).items()})


def _encode_inputs(
    files: list[Path], tokenizer, options: PrepareOptions, stats: PrepareStats, progress: bool
) -> Documents:
    """Every input's documents, encoded and joined in input order; counts bytes, replacements and empty files."""
    from tqdm import tqdm

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
    stats.documents = len(documents)
    stats.sentences = documents.num_sentences
    return documents


def _check_documents(documents: Documents, files: list[Path], options: PrepareOptions) -> None:
    if not len(documents):
        raise InputError(f"no text in any input ({len(files)} file(s) read)")
    if options.objective == "nsp" and len(documents) < 2:
        raise InputError(
            "NSP needs at least two documents to draw negatives from (separate documents in .txt "
            "files with a blank line)"
        )


def _shard_writer(out_dir: Path, tokenizer, options: PrepareOptions) -> ShardWriter:
    special = {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }
    return ShardWriter(
        out_dir,
        vocab_tokens=tokenizer.vocab.tokens,
        special_ids=special,
        seq_len=options.seq_len,
        objective=options.objective,
        seed=options.seed,
        shard_size=options.shard_size,
        extra_meta={"do_lower_case": options.do_lower_case, "whole_word": options.whole_word},
    )


def _write_segment_pairs(
    documents: Documents, writer: ShardWriter, options: PrepareOptions, stats: PrepareStats, progress: bool
) -> None:
    """Cut every document into samples with the C++ pair cutter, ``PAIR_BLOCK`` documents per call, and hand them to
    ``writer``; counts truncated tokens and dropped segments."""
    from tqdm import tqdm

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
