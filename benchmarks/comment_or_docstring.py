"""A real-text classification task every machine has: is a line of the installed Python's standard library a
``# comment`` or the first sentence of a docstring?

The fine-tuning benchmarks (bench_finetune.py, gpu_acceptance.py's finetune section) and the fine-tuning tests
train on it; the product never does. Examples are 4 to 40 words long, so batches mix padded lengths.
"""

from __future__ import annotations

import ast
import io
import random
import tokenize
import warnings

from fastbert.data.corpus import stdlib_root


def stdlib_comment_or_docstring(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (text, label) pairs, label ``"comment"`` or ``"docstring"``, balanced, in a seeded random order."""
    docs, comments = [], []
    for path in sorted(stdlib_root().glob("*.py")):
        source = path.read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
            tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
        docs += _docstring_first_sentences(tree)
        comments += _comments(tokens)
    rng = random.Random(seed)
    rng.shuffle(docs)
    rng.shuffle(comments)
    half = count // 2
    if len(docs) < half or len(comments) < count - half:
        raise ValueError(
            f"the standard library has {len(docs)} docstrings and {len(comments)} comments; {count} examples asked for"
        )
    rows = [(t, "docstring") for t in docs[:half]] + [(t, "comment") for t in comments[: count - half]]
    rng.shuffle(rows)
    return rows


def _docstring_first_sentences(tree: ast.AST) -> list[str]:
    """The first paragraph of every class and function docstring, on one line, when it has 4 to 40 words."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                first = " ".join(doc.split("\n\n")[0].split())
                if 4 <= len(first.split()) <= 40:
                    found.append(first)
    return found


def _comments(tokens: list[tokenize.TokenInfo]) -> list[str]:
    """Every comment of 4 to 40 words, without its ``#``; shebangs and coding lines left out."""
    found = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if 4 <= len(text.split()) <= 40 and not text.startswith(("!", "-*-")):
                found.append(text)
    return found
