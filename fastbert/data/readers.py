"""Finding input files and reading their documents: what ``prepare-data``, ``train-vocab`` and ``tokenize`` read.

Inputs are ``.txt`` (a blank line between documents), ``.jsonl`` (one document per line, in a text field) and
``.parquet`` (a text column), given as files, directories (searched recursively) or glob patterns. Bad input is
never silently dropped: invalid UTF-8 is an error naming the file and byte offset (or, with ``errors="replace"``,
replaced and counted); a malformed JSON line names its file and line. Splitting documents into sentences and
encoding them is ``fastbert.data.encoding``'s business.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")


class InputError(ValueError):
    """Input text that cannot be read as asked; the message names the file and where. Raised by prepare-data and
    by ``fastbert tokenize``, the two readers of text files."""


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


def read_documents(path: Path, errors: str = "strict", text_field: str = "text") -> tuple[list[str], int, int]:
    """The documents of one input file, its size in bytes and the number of replaced characters."""
    if path.suffix == ".parquet":
        return _parquet_documents(path, text_field), path.stat().st_size, 0
    data = path.read_bytes()
    text, replaced = _decode(path, data, errors)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text, text_field), len(data), replaced
    return _txt_documents(text), len(data), replaced


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


def _parquet_documents(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
    return [t for t in table.column(text_field).to_pylist() if t is not None and t.strip()]


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[str]:
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
    return docs


def _txt_documents(text: str) -> list[str]:
    """Blank lines separate documents; a document's lines are joined with single spaces."""
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs
