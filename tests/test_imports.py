"""The torch-free parts of fastbert stay torch-free: the tokenizer, ``fastbert --help``, ``fastbert tokenize`` and
prepare-data (its parent and its worker processes) never import torch, which costs seconds and memory per process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

NO_TORCH = """
import sys
assert "torch" not in sys.modules, "torch was imported"
"""

# Runs the command line as `python -m fastbert` does, and checks sys.modules however the command ends.
CLI = """
import runpy, sys
sys.argv = ["fastbert", *{args!r}]
try:
    runpy.run_module("fastbert", run_name="__main__", alter_sys=True)
finally:
    assert "torch" not in sys.modules, "torch was imported"
"""


def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def text_file(tmp_path: Path, real_sentences: list[str]) -> Path:
    documents = [" ".join(real_sentences[k : k + 4]) for k in range(0, len(real_sentences), 4)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(documents) + "\n")
    return tmp_path / "corpus.txt"


def test_the_tokenizer_and_config_import_without_torch(vocab_path, tmp_path):
    result = python(
        f"""
from fastbert import BertConfig
from fastbert.tokenizer import WordPieceTokenizer
tokenizer = WordPieceTokenizer.from_vocab({str(vocab_path)!r})
assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
assert BertConfig.preset("tiny").hidden_size > 0
{NO_TORCH}""",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["--help", "tokenize", "prepare-data"])
def test_the_command_line_runs_without_torch(command, vocab_path, text_file, tmp_path):
    args = {
        "--help": ["--help"],
        "tokenize": ["tokenize", str(text_file), "--vocab", str(vocab_path), "--no-progress"],
        "prepare-data": [
            "prepare-data",
            str(text_file),
            "--vocab",
            str(vocab_path),
            "--out",
            str(tmp_path / "d"),
            "--seq-len",
            "64",
            "--workers",
            "2",
        ],
    }[command]
    result = python(CLI.format(args=args), tmp_path)
    assert result.returncode == 0, result.stderr
    if command == "prepare-data":
        assert (tmp_path / "d" / "meta.json").exists()
    else:
        assert result.stdout.strip()


def test_a_prepare_data_worker_starts_without_torch(vocab_path, text_file, tmp_path):
    """What a worker process runs (all of it under the spawn start method, where the worker imports the module
    afresh): the initializer, then encode_documents."""
    result = python(
        f"""
from fastbert.data.encoding import encode_documents, init_worker
init_worker({str(vocab_path)!r}, True)
documents = encode_documents(open({str(text_file)!r}).read().split("\\n\\n"))
assert len(documents) > 0 and documents.num_sentences > len(documents)
{NO_TORCH}""",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_the_lazy_names_are_the_same_objects():
    import fastbert
    from fastbert.config import BertConfig
    from fastbert.model import BertForPreTraining

    assert fastbert.BertConfig is BertConfig and fastbert.BertForPreTraining is BertForPreTraining
    namespace: dict = {}
    exec("from fastbert import *", namespace)
    assert set(fastbert.__all__) <= set(namespace) and set(fastbert.__all__) <= set(dir(fastbert))
    with pytest.raises(AttributeError, match="no attribute 'Bert'"):
        fastbert.Bert  # noqa: B018
