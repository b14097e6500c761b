"""A real English corpus that every machine has: the docstrings of the installed Python's standard library.

Used by ``fastbert demo``, and by the tests and benchmarks that need real text. Each module's docstrings form one
document; paragraphs are reflowed onto single lines and code-like lines (doctest prompts, indented blocks) are
dropped, so what remains is prose. The order is deterministic (sorted paths), so the corpus is the same on every
run of one Python.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

_SKIPPED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _prose_paragraphs(docstring: str) -> Iterator[str]:
    for block in docstring.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$", "|", "+-", "==", "--")) for line in lines):
            continue
        text = " ".join(line for line in lines if line)
        words = text.split()
        letters = sum(ch.isalpha() for ch in text)
        if len(words) >= 6 and letters >= 0.7 * len(text.replace(" ", "")):
            yield text


def stdlib_documents(limit_bytes: int | None = None) -> Iterator[list[str]]:
    """Yield documents (lists of prose paragraphs), one per stdlib module with enough docstring prose."""
    total = 0
    for path in sorted(stdlib_root().rglob("*.py")):
        if _SKIPPED_DIRS & set(path.relative_to(stdlib_root()).parts[:-1]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in some modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        paragraphs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs.extend(_prose_paragraphs(doc))
        if len(paragraphs) >= 2:
            yield paragraphs
            total += sum(len(p) for p in paragraphs)
            if limit_bytes is not None and total >= limit_bytes:
                return
