"""``fastbert demo``, the README's first command, runs end to end (shortened to 2 steps) and leaves what it
promises: a model that loads, a curves PNG, and the fill-mask lines."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def test_demo_runs_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from fastbert import BertForPreTraining
    from fastbert.tokenizer import WordPieceTokenizer

    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fastbert", "demo", "--out", str(out), "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # writes under --out only

    for step in range(1, 7):
        assert f"[{step}/6] " in result.stdout, result.stdout
    fills = re.findall(r"^ +(.*\[MASK\].*)\n +answer: '(\w+)'; model's top 5: (\[.*\])$", result.stdout, re.M)
    assert fills, result.stdout
    assert all(len(eval(guesses)) == 5 for _, _, guesses in fills)  # noqa: S307 - a list literal we printed

    png = out / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    model = BertForPreTraining.from_pretrained(out / "hf").eval()
    tokenizer = WordPieceTokenizer.from_pretrained(out / "hf")
    assert model.config.vocab_size == len(tokenizer.vocab)
    ids = tokenizer.encode("the event loop [MASK] callbacks")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).prediction_logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
