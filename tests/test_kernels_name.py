"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package, which
transformers imports: Python puts the current directory first on ``sys.path`` for ``python -c``, ``python -m``, a
REPL and a script on stdin, so each of those is run here from the repository root, in a subprocess, with HF's
``kernels`` installed. ``fastbert.kernels`` still comes from the folder (kernels/README.md says how)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What every process below checks: `kernels` is HF's installed package, transformers' model classes import, and
# fastbert.kernels is the repository's folder.
CHECKS = """
import kernels, transformers
from pathlib import Path
import fastbert.kernels.attention as attention
root = Path({root!r})
assert not Path(kernels.__file__).resolve().is_relative_to(root), f"`kernels` is {{kernels.__file__}}"
assert Path(attention.__file__).resolve().parent == root / "kernels", attention.__file__
transformers.BertForMaskedLM, transformers.BertModel, transformers.ElectraForPreTraining
"""

# A REPL session: a transformers BERT patched with fastbert's fused modules, as the README suggests.
REPL = """
import torch, transformers
from fastbert.nn import patch_hf_bert
config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37)
model = patch_hf_bert(transformers.BertForMaskedLM(config).eval())
ids = torch.tensor([[2, 5, 7, 3]])
print("logits", tuple(model(input_ids=ids).logits.shape))
"""


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers >= 5.2x depends on it)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def run(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args} from {ROOT}:\n{result.stdout}\n{result.stderr}"
    return result


def test_python_c_and_a_script_on_stdin_from_the_repository_root(env):
    checks = CHECKS.format(root=str(ROOT))
    run(["-c", checks], env)
    run(["-"], env, stdin=checks)


def test_a_repl_from_the_repository_root(env):
    result = run(["-i", "-q"], env, stdin=CHECKS.format(root=str(ROOT)) + REPL)
    assert "logits (1, 4, 99)" in result.stdout, result.stdout


def test_python_m_pytest_and_python_m_fastbert_from_the_repository_root(env):
    result = run(["-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_model_hf.py"], env)
    assert "error" not in result.stdout.lower(), result.stdout
    result = run(["-m", "fastbert", "info"], env)
    assert result.stdout.startswith("fastbert"), result.stdout
