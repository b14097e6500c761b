"""The ``fastbert`` console script."""

from __future__ import annotations

import subprocess


def test_help_and_info():
    help_text = subprocess.run(["fastbert", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in help_text
    info = subprocess.run(["fastbert", "info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in info
    for backend in ("C++ tokenizer", "Triton", "CUDA", "DeepSpeed"):
        assert backend in info
    assert "C++ tokenizer  yes" in info  # the extension is built by `pip install -e .`
    assert "CUDA           no" in info or "CUDA           yes" in info


def test_no_command_prints_help_and_fails():
    result = subprocess.run(["fastbert"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: fastbert" in result.stdout
