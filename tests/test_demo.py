"""``fastbert demo``, the README's first command, runs end to end (shortened to 2 steps) and leaves what it
promises: a model that loads, a curves PNG, and the fill-mask lines; run again, it continues."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fastbert.demo import PROBES


def _demo(out, steps: int, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastbert", "demo", "--out", str(out), "--steps", str(steps)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_demo_runs_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from fastbert.deberta import DebertaForPreTraining
    from fastbert.tokenizer import WordPieceTokenizer

    out = tmp_path / "demo"
    result = _demo(out, 2, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # writes under --out only

    for step in range(1, 7):
        assert f"[{step}/6] " in result.stdout, result.stdout
    scores = re.search(
        r"this model ([\d.]+) nats; a unigram count model \(token frequencies\) ([\d.]+); a bigram count model "
        r"\(the token on the left\) ([\d.]+)",
        result.stdout,
    )
    assert scores, result.stdout
    model_loss, unigram, bigram = map(float, scores.groups())
    assert 0 < bigram < unigram < 9  # the bigram model, seeing a neighbour, does better (an 8000-token vocab)
    assert abs(model_loss - unigram) < 0.5  # 2 steps from the output bias at the shards' log-frequencies
    fills = re.findall(r"^ +(.*\[MASK\].*)\n +answer: '(\w+)'; model's top 5: (\[.*\])$", result.stdout, re.M)
    assert [(probe, answer) for probe, answer, _ in fills] == list(PROBES), result.stdout
    assert all(len(eval(guesses)) == 5 for _, _, guesses in fills)  # noqa: S307 - a list literal we printed
    corpus = (out / "corpus.txt").read_text(encoding="utf-8").lower()
    assert not any(probe.replace("[MASK]", answer).lower() in corpus for probe, answer in PROBES)  # held out
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "deberta-v2"  # the recipe's model

    png = out / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    model = DebertaForPreTraining.from_pretrained(out / "hf").eval()
    tokenizer = WordPieceTokenizer.from_pretrained(out / "hf")
    assert model.config.vocab_size == len(tokenizer.vocab)
    ids = tokenizer.encode("the event loop [MASK] callbacks")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).prediction_logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()

    # Run again, the demo keeps the corpus, vocabulary and shards it made and resumes pretraining: nothing is
    # overwritten, and the run's metrics hold each step once (one test with the first run: a demo costs seconds).
    kept = ("vocab.txt", "data/meta.json", "corpus.txt", "held_out.txt")
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in kept}
    second = _demo(out, 3, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert second.stdout.count("(done in an earlier run: kept)") == 3, second.stdout  # corpus, vocabulary, shards
    assert {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in kept} == before
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_the_demo_refuses_a_directory_that_is_not_a_demo(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    result = _demo(out, 2, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--out {out} is not empty and holds no demo.json" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
