"""Fine-tuning data formats: GLUE-style tables (TSV, CSV, JSONL), CoNLL token files, SQuAD v1.1/v2.0 JSON.

Readers return plain records that remember their file and line, and raise ``TaskDataError`` naming the file, line
and field of a malformed row, or, with ``skip_bad_rows``, count it in a ``BadRows`` tally instead. Files are UTF-8
(a leading byte-order mark is allowed); bytes that are not are reported as ``file:line`` with their offset, never as
a bare ``UnicodeDecodeError``. They do not tokenize (``fastbert.tasks.features`` does).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


class TaskDataError(ValueError):
    """A malformed fine-tuning file; the message names the file, line and field."""


@dataclass
class BadRows:
    """Rows skipped under ``--skip-bad-rows``, with the reason of each."""

    skipped: list[str] = field(default_factory=list)

    def handle(self, message: str, skip: bool) -> None:
        if not skip:
            raise TaskDataError(message)
        self.skipped.append(message)


@dataclass
class TextExample:
    text: str
    pair: str | None
    label: str | float | None
    where: str  # "file:line"


@dataclass
class TokenExample:
    words: list[str]
    tags: list[str] | None
    where: str


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start in context)
    impossible: bool
    where: str


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (BOM stripped, line endings untouched); undecodable bytes become a
    ``TaskDataError`` naming the line, the byte's offset in it and in the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_no = data.count(b"\n", 0, e.start) + 1
        raise TaskDataError(
            f"{path}:{line_no}: not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start - line_start} of the "
            f"line (byte {e.start} of the file): {e.reason}; re-save the file as UTF-8"
        ) from None


def _lines(text: str) -> list[str]:
    """Lines split at ``\\n`` (a ``\\r`` before it dropped) so numbers match an editor's and the decoder's; not
    ``str.splitlines``, which also splits at U+2028, form feeds and other characters a JSON string may hold."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _rows(path: Path) -> list[tuple[int, dict, str | None]]:
    """(line number, row, problem) triples of a .tsv, .csv or .jsonl table. ``problem`` is None for a row with
    exactly the header's fields, else what is wrong: more or fewer fields than the header (TSV/CSV), or other keys
    than the first record's (JSONL). Blank lines are skipped."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix not in (".tsv", ".csv"):
        raise TaskDataError(f"{path}: unsupported table format {suffix!r} (expected .tsv, .csv or .jsonl)")
    return _delimited_rows(path, suffix)


def _jsonl_rows(path: Path) -> list[tuple[int, dict, str | None]]:
    rows, columns, first = [], None, 0
    for line_no, line in enumerate(_lines(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}:{line_no}: expected a JSON object")
        problem = None
        if columns is None:
            columns, first = list(row), line_no
        elif set(row) != set(columns):
            missing = [k for k in columns if k not in row]
            extra = [k for k in row if k not in columns]
            problem = (
                f"{len(row)} fields but the first record (line {first}) has {len(columns)}"
                + (f"; missing {', '.join(map(repr, missing))}" if missing else "")
                + (f"; extra {', '.join(map(repr, extra))}" if extra else "")
            )
        rows.append((line_no, row, problem))
    return rows


def _delimited_rows(path: Path, suffix: str) -> list[tuple[int, dict, str | None]]:
    reader = csv.reader(
        io.StringIO(_read_text(path), newline=""),
        delimiter="\t" if suffix == ".tsv" else ",",
        quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
    )
    separator = "tab" if suffix == ".tsv" else "comma"
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise TaskDataError(f"{path}: empty file (expected a header line)")
        rows = []
        for fields in reader:
            if not fields:  # a blank line
                continue
            problem = None
            if len(fields) > len(header):
                problem = (
                    f"{len(fields)} fields but the header has {len(header)} (an unquoted {separator} inside a field, "
                    f"or a {separator} too many?)"
                )
            elif len(fields) < len(header):
                absent = ", ".join(repr(c) for c in header[len(fields) :])
                plural = "s" * (len(fields) != 1)
                problem = f"{len(fields)} field{plural} but the header has {len(header)} (no {absent})"
            rows.append((reader.line_num, dict(zip(header, fields, strict=False)), problem))
        return rows
    except csv.Error as e:  # e.g. a field over csv's size limit, a NUL byte
        raise TaskDataError(f"{path}:{reader.line_num}: malformed {suffix[1:].upper()} row: {e}") from None


def read_text_examples(
    path: str | os.PathLike,
    text_column: str = "text",
    pair_column: str | None = None,
    label_column: str | None = "label",
    regression: bool = False,
    skip_bad_rows: bool = False,
    bad: BadRows | None = None,
) -> list[TextExample]:
    """Single texts or text pairs with a class label (or a float for regression; no label for prediction)."""
    path, bad = Path(path), bad if bad is not None else BadRows()
    out = []
    for line_no, row, problem in _rows(path):
        where = f"{path}:{line_no}"
        if problem is not None:
            bad.handle(f"{where}: {problem}", skip_bad_rows)
            continue
        text = row.get(text_column)
        pair = row.get(pair_column) if pair_column else None
        if not isinstance(text, str) or (pair_column and not isinstance(pair, str)):
            missing = text_column if not isinstance(text, str) else pair_column
            bad.handle(f"{where}: missing text field {missing!r}", skip_bad_rows)
            continue
        label = None
        if label_column is not None:
            value = row.get(label_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                bad.handle(f"{where}: missing label field {label_column!r}", skip_bad_rows)
                continue
            if regression:
                try:
                    label = float(value)
                except (TypeError, ValueError):
                    bad.handle(f"{where}: label {value!r} is not a number", skip_bad_rows)
                    continue
            else:
                label = str(value).strip()
        out.append(TextExample(text, pair, label, where))
    return out


def read_conll(
    path: str | os.PathLike, with_tags: bool = True, skip_bad_rows: bool = False, bad: BadRows | None = None
) -> list[TokenExample]:
    """CoNLL: one token per line, the tag in the last column, a blank line between sentences; ``-DOCSTART-``
    lines are skipped."""
    path, bad = Path(path), bad if bad is not None else BadRows()
    out, words, tags, start, broken = [], [], [], 1, False
    lines = _lines(_read_text(path))
    for line_no, line in enumerate([*lines, ""], 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words and not broken:
                out.append(TokenExample(words, tags if with_tags else None, f"{path}:{start}"))
            words, tags, start, broken = [], [], line_no + 1, False
            continue
        if with_tags and len(parts) < 2:
            bad.handle(f"{path}:{line_no}: token {parts[0]!r} has no tag", skip_bad_rows)
            broken = True
            continue
        words.append(parts[0])
        tags.append(parts[-1])
    return out


def read_squad(path: str | os.PathLike, skip_bad_rows: bool = False, bad: BadRows | None = None) -> list[QAExample]:
    """SQuAD v1.1 / v2.0 JSON; every answer must lie inside its context where it says it does."""
    path, bad = Path(path), bad if bad is not None else BadRows()
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(f"{path}: expected a SQuAD object with a 'data' list")
    out = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}] (id {qa.get('id')!r})"
                if not isinstance(context, str) or not isinstance(qa.get("question"), str):
                    bad.handle(f"{where}: missing context or question", skip_bad_rows)
                    continue
                impossible = bool(qa.get("is_impossible", False))
                answers, ok = [], True
                for ans in qa.get("answers", []):
                    text, start = ans.get("text"), ans.get("answer_start")
                    if (
                        not isinstance(text, str)
                        or not isinstance(start, int)
                        or context[start : start + len(text)] != text
                    ):
                        bad.handle(f"{where}: answer {text!r} at {start} is not in its context", skip_bad_rows)
                        ok = False
                        break
                    answers.append((text, start))
                if not ok:
                    continue
                if not answers and not impossible:
                    bad.handle(f"{where}: no answers and not marked is_impossible", skip_bad_rows)
                    continue
                out.append(
                    QAExample(str(qa.get("id", f"{a}-{p}-{q}")), qa["question"], context, answers, impossible, where)
                )
    return out


# Label sets -------------------------------------------------------------------------------------------------------
def parse_label_list(spec: str) -> list[str]:
    """``--labels``: a file with one label per line (blank lines ignored), or else a comma-separated list. The order
    is kept: it is the model's ``id2label``. A duplicate or (in a list) an empty label is an error."""
    path = Path(spec)
    if path.is_file():
        source, items = str(path), [(f"{path}:{n}", line.strip()) for n, line in enumerate(_lines(_read_text(path)), 1)]
        items = [(where, label) for where, label in items if label]
    else:
        source, items = "--labels", [(f"--labels item {k + 1}", x.strip()) for k, x in enumerate(spec.split(","))]
        empty = [where for where, label in items if not label]
        if empty:
            raise TaskDataError(f"{empty[0]}: empty label in {spec!r} (a comma-separated list, or a file of labels)")
    seen: dict[str, str] = {}
    for where, label in items:
        if label in seen:
            raise TaskDataError(f"{where}: duplicate label {label!r} (first at {seen[label]})")
        seen[label] = where
    if not seen:
        raise TaskDataError(f"{source}: no labels")
    return list(seen)


def labels_of(example: TextExample | TokenExample) -> list[tuple[str, str]]:
    """(label, file:line) for each label an example carries: its class, or each word's tag (a CoNLL token's line is
    its sentence's first line plus its index, tokens being one per line)."""
    if isinstance(example, TokenExample):
        path, _, start = example.where.rpartition(":")
        base = int(start) if start.isdigit() and path else None
        tags = example.tags or []
        return [(tag, f"{path}:{base + i}" if base is not None else example.where) for i, tag in enumerate(tags)]
    return [] if example.label is None else [(str(example.label), example.where)]


def check_labels(examples: list, known: list[str], skip_bad_rows: bool, bad: BadRows, what: str = "--labels") -> list:
    """The examples all of whose labels are in ``known``; another is an error naming its file:line and label (or,
    with ``skip_bad_rows``, counted and dropped)."""
    allowed, kept = set(known), []
    for example in examples:
        unknown = [(label, where) for label, where in labels_of(example) if label not in allowed]
        if unknown:
            label, where = unknown[0]
            bad.handle(f"{where}: unknown label {label!r} ({what}: {known})", skip_bad_rows)
            continue
        kept.append(example)
    return kept


def check_label_counts(
    examples: list, min_count: int, skip_bad_rows: bool, bad: BadRows, path: str | os.PathLike
) -> list:
    """Without a declared label set, a label seen fewer than ``min_count`` times in the training file is taken for
    a typo rather than a class: an error naming it, its count and its first file:line (or, with ``skip_bad_rows``,
    the examples carrying it are counted and dropped). ``min_count`` 0 or 1 accepts every label."""
    if min_count <= 1:
        return examples
    counts: dict[str, int] = {}
    for example in examples:
        for label, _ in labels_of(example):
            counts[label] = counts.get(label, 0) + 1
    rare = {label for label, n in counts.items() if n < min_count}
    if not rare:
        return examples
    kept = []
    for example in examples:
        # The first example carrying a rare label holds that label's first occurrence: the error names it.
        hit = next(((label, where) for label, where in labels_of(example) if label in rare), None)
        if hit is None:
            kept.append(example)
            continue
        label, where = hit
        n = counts[label]
        bad.handle(
            f"{where}: label {label!r} appears {n} time{'s' * (n != 1)} in {path}, fewer than --min-label-count "
            f"{min_count}: a typo? List the classes with --labels, or pass --min-label-count 0",
            skip_bad_rows,
        )
    return kept
