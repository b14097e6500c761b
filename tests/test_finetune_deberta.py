"""``fastbert finetune --model`` on a DeBERTa directory, for every task: the DeBERTa heads train through the same
driver as BERT's, and what they save loads in transformers' ``DebertaV2For*`` classes with the same outputs (the
independent reference). A random-init 2-layer DeBERTa with the real 30,522-word vocabulary and log buckets shorter
than the sequences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import _conll_sentences, _squad_file, write_table

from fastbert.deberta import (
    DebertaConfig,
    DebertaForMaskedLM,
    DebertaForQuestionAnswering,
    DebertaForSequenceClassification,
    DebertaForTokenClassification,
)
from fastbert.tasks import features as feats
from fastbert.tokenizer import WordPieceTokenizer
from fastbert.train.finetune import FinetuneArgs, check_model, finetune

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the fine-tuning task
from comment_or_docstring import stdlib_comment_or_docstring  # noqa: E402


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory, minilm_dir) -> Path:
    out = tmp_path_factory.mktemp("deberta")
    torch.manual_seed(0)
    config = DebertaConfig.preset(
        "deberta-tiny",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        position_buckets=16,
        max_relative_positions=128,
    )
    DebertaForMaskedLM(config).save_pretrained(out)
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


def _hf(cls_name: str, directory: Path):
    return getattr(transformers, cls_name).from_pretrained(directory).eval()


def test_classification_through_the_cli_saves_what_transformers_predicts(deberta_dir, tmp_path):
    rows = stdlib_comment_or_docstring(160, seed=1)
    write_table(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in rows[:96]])
    write_table(tmp_path / "eval.jsonl", [{"text": t, "label": y} for t, y in rows[96:]])
    result = subprocess.run(
        [
            *(sys.executable, "-m", "fastbert", "finetune", "--task", "classify", "--model", str(deberta_dir)),
            *("--train", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl")),
            *("--predict", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "out")),
            *("--epochs", "2", "--lr", "1e-3", "--max-length", "64", "--no-progress"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = tmp_path / "out" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["model_type"] == "deberta-v2" and config["architectures"] == ["DebertaV2ForSequenceClassification"]
    assert "eval_accuracy" in json.loads((tmp_path / "out" / "eval_results.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 64
    hf = _hf("DebertaV2ForSequenceClassification", best)
    tok = transformers.BertTokenizerFast(str(best / "vocab.txt"), do_lower_case=True)
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    with torch.no_grad():
        enc = tok([t for t, _ in rows[96:]], truncation=True, max_length=64, padding=True, return_tensors="pt")
        probabilities = hf(**enc).logits.softmax(-1)
    for line, p in zip(lines, probabilities, strict=True):
        assert [line["probabilities"][n] for n in names] == pytest.approx(p.tolist(), abs=1e-5)
        assert line["prediction"] == names[int(p.argmax())]


def test_regression_ner_and_qa_heads_train_and_match_transformers(deberta_dir, tmp_path):
    rows = stdlib_comment_or_docstring(96, seed=2)
    write_table(tmp_path / "reg.jsonl", [{"text": t, "label": min(len(t.split()), 20) / 20} for t, _ in rows])
    common = dict(model=str(deberta_dir), epochs=2, lr=1e-3, max_length=64, progress=False)
    reg = finetune(
        FinetuneArgs(
            task="regress",
            train=str(tmp_path / "reg.jsonl"),
            eval=str(tmp_path / "reg.jsonl"),
            out=str(tmp_path / "reg"),
            **common,
        )  # fmt: skip
    )
    assert "eval_pearson" in reg
    sentences = _conll_sentences(60)
    conll = "\n\n".join("\n".join(f"{w} X {t}" for w, t in zip(ws, ts, strict=True)) for ws, ts in sentences)
    (tmp_path / "train.conll").write_text("-DOCSTART- O\n\n" + conll + "\n")
    ner = finetune(
        FinetuneArgs(
            task="ner",
            train=str(tmp_path / "train.conll"),
            eval=str(tmp_path / "train.conll"),
            out=str(tmp_path / "ner"),
            **common,
        )  # fmt: skip
    )
    assert 0 <= ner["eval_f1"] <= 1
    # The saved heads against transformers' on one padded batch (padding excluded).
    tok = WordPieceTokenizer.from_pretrained(deberta_dir)
    batch = tok([t for t, _ in rows[:5]], truncation=True, max_length=64, padding=True, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    for ours, theirs, directory in (
        (DebertaForSequenceClassification, "DebertaV2ForSequenceClassification", tmp_path / "reg" / "best"),
        (DebertaForTokenClassification, "DebertaV2ForTokenClassification", tmp_path / "ner" / "best"),
    ):
        with torch.no_grad():
            a = ours.from_pretrained(directory).eval()(**batch).logits
            b = _hf(theirs, directory)(**batch).logits
        if a.dim() == 3:
            a, b = a[keep], b[keep]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_qa_trains_and_its_spans_are_transformers(deberta_dir, tmp_path):
    """Decoding is the task's, tested on BERT (tests/test_finetune.py overfits it to exact answers); here the DeBERTa
    head trains through the driver and its start/end logits are transformers'."""
    examples = _squad_file(tmp_path / "squad.json")
    result = finetune(
        FinetuneArgs(
            task="qa",
            model=str(deberta_dir),
            train=str(tmp_path / "squad.json"),
            eval=str(tmp_path / "squad.json"),
            out=str(tmp_path / "out"),
            max_length=64,
            doc_stride=24,
            epochs=2,
            lr=1e-3,
            batch_size=8,
            dropout=0.0,
            progress=False,
        )
    )
    assert 0.0 <= result["eval_exact_match"] <= 100.0
    best = tmp_path / "out" / "best"
    tok = WordPieceTokenizer.from_pretrained(deberta_dir)
    features = feats.qa_features(tok, examples, max_length=64, doc_stride=24)
    inputs = feats.collate_qa(features, tok.pad_token_id, with_positions=False)
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        a = DebertaForQuestionAnswering.from_pretrained(best).eval()(**inputs)
        b = _hf("DebertaV2ForQuestionAnswering", best)(**inputs)
    torch.testing.assert_close(a.start_logits[keep], b.start_logits[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.end_logits[keep], b.end_logits[keep], atol=1e-5, rtol=1e-5)


def test_a_deberta_directory_without_a_wordpiece_vocabulary_is_refused(deberta_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((deberta_dir / name).read_bytes())
    with pytest.raises(Exception, match="DeBERTa directory without vocab.txt"):
        check_model(str(bare))
