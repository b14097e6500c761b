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
    ``fastbert.data.prepare.InputError`` naming the line."""
    from fastbert import _wordpiece
    from fastbert.data.prepare import InputError

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
    from tqdm import tqdm

    from fastbert.data.prepare import InputError
    from fastbert.tokenizer import VocabError, WordPieceTokenizer

    try:
        if args.vocab.is_dir():
            tokenizer = WordPieceTokenizer.from_pretrained(args.vocab)
            if args.cased:
                tokenizer = WordPieceTokenizer(
                    tokenizer.vocab, False, source=str(args.vocab), **tokenizer.special_tokens
                )
        else:
            tokenizer = WordPieceTokenizer.from_vocab(args.vocab, do_lower_case=not args.cased)
    except (VocabError, ValueError, OSError) as e:
        print(f"fastbert tokenize: error: {e}", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"fastbert tokenize: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2

    if args.output is not None and not args.output.parent.is_dir():
        print(
            f"fastbert tokenize: error: -o {args.output}: the directory {args.output.parent} does not exist",
            file=sys.stderr,
        )
        return 2
    total = sum(p.stat().st_size for p in args.files)
    # The output appears whole under its name at the end, or not at all.
    sink = (
        contextlib.nullcontext(sys.stdout) if args.output is None else open_atomic(args.output, "w", encoding="utf-8")
    )
    try:
        with (
            sink as out,
            tqdm(
                total=total,
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
    except (InputError, OSError) as e:
        print(f"fastbert tokenize: error: {e}", file=sys.stderr)
        return 1
    return 0
