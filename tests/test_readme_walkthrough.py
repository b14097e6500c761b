"""The README's command-line walkthrough runs as written, in order, on a small real corpus: every line of its
```bash block (launcher variants aside) is run with only its sizes scaled down (steps, batches, vocabulary), so a
renamed flag, a changed default or a step that no longer feeds the next one fails here."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastbert.data.corpus import stdlib_documents

ROOT = Path(__file__).resolve().parent.parent
# flag -> the small value used here; every other argument is the README's own
SMALLER = {
    "--vocab-size": "3000",
    "--steps": "4",
    "--global-batch": "8",
    "--micro-batch": "4",
    "--warmup": "1",
    "--save-every": "2",
    "--epochs": "1",
    "--workers": "1",
}


def walkthrough() -> list[list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"The command line does the rest.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md lost its command-line walkthrough"
    text = block.group(1).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "fastbert" or "..." in words:  # launcher variants repeat a command shown above
            continue
        commands.append([SMALLER.get(words[i - 1], w) if i else w for i, w in enumerate(words)])
    return commands


def _inputs(cwd: Path) -> None:
    docs = [" ".join(p) for p in stdlib_documents(limit_bytes=150_000)]
    (cwd / "corpus").mkdir()
    half = len(docs) // 2
    (cwd / "corpus" / "a.txt").write_text("\n\n".join(docs[:half]) + "\n")
    (cwd / "corpus" / "b.txt").write_text("\n\n".join(docs[half:]) + "\n")
    (cwd / "corpus.txt").write_text("\n".join(docs[:50]) + "\n")
    sentences = [s.strip() for d in docs for s in d.split(". ") if 5 <= len(s.split()) <= 30 and "\t" not in s]
    random.Random(0).shuffle(sentences)
    rows = ["text\tlabel"] + [f"{s}\t{'long' if len(s.split()) > 12 else 'short'}" for s in sentences[:240]]
    (cwd / "train.tsv").write_text("\n".join(rows[:200]) + "\n")
    (cwd / "dev.tsv").write_text("\n".join([rows[0], *rows[200:]]) + "\n")


def test_the_walkthrough_lists_the_main_commands():
    names = [c[1] for c in walkthrough()]
    for command in ("train-vocab", "prepare-data", "pretrain", "export", "finetune", "distill", "fill-mask"):
        assert command in names, f"the README walkthrough no longer shows {command}"


@pytest.mark.timeout(1500)
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    _inputs(tmp_path)
    for command in walkthrough():
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "fastbert", *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        shown = " ".join(command)
        print(f"{time.perf_counter() - started:6.1f} s  {shown}")
        assert result.returncode == 0, f"{shown}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{shown}\n{result.stderr[-3000:]}"
    assert (tmp_path / "hf-model" / "model.safetensors").exists()
    assert (tmp_path / "ft" / "eval_results.json").exists() and (tmp_path / "student" / "config.json").exists()
