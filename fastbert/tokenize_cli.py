"""The ``fastbert tokenize`` subcommand: text files in, WordPiece ids out, one output line per input line.

It owns reading the files in large chunks, rejecting invalid UTF-8 with the file, line and byte offset, and the
progress bar; tokenization itself is ``fastbert.tokenizer.WordPieceTokenizer.encode_batch`` on C++ threads.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from fastbert.atomic import open_atomic

CHUNK_BYTES = 4 << 20


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``tokenize`` on the ``fastbert`` command's subparsers."""
    parser = subparsers.add_parser(
        "tokenize",
        help="write the WordPiece ids of text files, one line of ids per input line",
        description="Tokenize UTF-8 text files with a BERT vocabulary. Each input line becomes one output line of "
        "space-separated ids (an empty line gives an empty line).",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", type=Path, help="UTF-8 text files")
    parser.add_argument(
        "--vocab", required=True, type=Path, help="a vocab.txt, or a directory with vocab.txt and tokenizer_config.json"
    )
    parser.add_argument("--cased", action="store_true", help="keep case and accents (default: lowercase, strip)")
    parser.add_argument("--add-special-tokens", action="store_true", help="wrap each line in [CLS] ... [SEP]")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    parser.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    parser.set_defaults(func=run)
    return parser


def read_lines(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[list[str], int]]:
    """Yields (lines, bytes consumed) in chunks of whole lines; invalid UTF-8 raises
    ``fastbert.data.readers.InputError`` naming the line."""
    from fastbert import _wordpiece
    from fastbert.data.readers import InputError

    line_no = 0
    with open(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(chunk_bytes)
            data = rest + block
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0:  # one line longer than the chunk: keep reading
                rest = data
                continue
            chunk, rest = data[:cut], data[cut:]
            bad = _wordpiece.find_invalid_utf8(chunk)
            if bad is not None:
                line_start = chunk.rfind(b"\n", 0, bad) + 1
                bad_line = line_no + chunk.count(b"\n", 0, bad) + 1
                raise InputError(f"{path}:{bad_line}: invalid UTF-8 at byte {bad - line_start} of the line")
            lines = chunk.decode("utf-8").split("\n")
            if lines[-1] == "":
                lines.pop()
            line_no += len(lines)
            yield lines, len(chunk)
            if not block:
                return


def run(args: argparse.Namespace) -> int:
    """Handler of ``fastbert tokenize``; returns the exit status."""
    from fastbert.data.readers import InputError
    from fastbert.tokenizer import VocabError

    try:
        tokenizer = _tokenizer(args.vocab, args.cased)
    except (VocabError, ValueError, OSError) as e:
        print(f"fastbert tokenize: error: {e}", file=sys.stderr)
        return 2
    problem = _argument_problem(args)
    if problem is not None:
        print(f"fastbert tokenize: error: {problem}", file=sys.stderr)
        return 2
    total_bytes = sum(p.stat().st_size for p in args.files)
    try:
        _write_ids(args, tokenizer, total_bytes)
    except (InputError, OSError) as e:
        print(f"fastbert tokenize: error: {e}", file=sys.stderr)
        return 1
    return 0


def _tokenizer(vocab: Path, cased: bool):
    """The tokenizer of a vocab.txt, or of a directory with vocab.txt and tokenizer_config.json (``cased``
    overrides the directory's casing)."""
    from fastbert.tokenizer import WordPieceTokenizer

    if not vocab.is_dir():
        return WordPieceTokenizer.from_vocab(vocab, do_lower_case=not cased)
    tokenizer = WordPieceTokenizer.from_pretrained(vocab)
    if cased:
        tokenizer = WordPieceTokenizer(tokenizer.vocab, False, source=str(vocab), **tokenizer.special_tokens)
    return tokenizer


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the input files or ``-o`` before anything is read, or None."""
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        return f"no such file: {', '.join(missing)}"
    if args.output is not None and not args.output.parent.is_dir():
        return f"-o {args.output}: the directory {args.output.parent} does not exist"
    return None


def _write_ids(args: argparse.Namespace, tokenizer, total_bytes: int) -> None:
    """Every input line's ids, to standard output or to ``-o`` (which appears whole under its name at the end, or
    not at all); the progress bar counts input bytes up to ``total_bytes``."""
    from tqdm import tqdm

    sink = (
        contextlib.nullcontext(sys.stdout) if args.output is None else open_atomic(args.output, "w", encoding="utf-8")
    )
    with (
        sink as out,
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenize",
            disable=args.no_progress or None,
            file=sys.stderr,
        ) as bar,
    ):
        for path in args.files:
            for lines, size in read_lines(path):
                ids = tokenizer.encode_batch(
                    lines, add_special_tokens=args.add_special_tokens, num_threads=args.threads
                )
                out.write("".join(" ".join(map(str, row)) + "\n" for row in ids))
                bar.update(size)
        out.flush()
