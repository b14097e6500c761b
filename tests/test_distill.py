"""Distillation: the student starts from every other teacher layer, trains on the triple loss, and exports to a
directory transformers loads."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from fastbert import BertConfig, BertForPreTraining
from fastbert.data.corpus import stdlib_documents
from fastbert.data.prepare import PrepareOptions, prepare
from fastbert.tokenizer import WordPieceTokenizer
from fastbert.train.distill import student_from_teacher


def test_student_takes_every_other_teacher_layer():
    teacher = BertForPreTraining(BertConfig.preset("tiny", vocab_size=500, num_hidden_layers=6))
    student = student_from_teacher(teacher, 3)
    assert student.config.num_hidden_layers == 3
    for i in range(3):
        for (name, p), (_, q) in zip(
            student.bert.encoder.layers[i].named_parameters(),
            teacher.bert.encoder.layers[2 * i].named_parameters(),
            strict=True,
        ):
            assert torch.equal(p, q), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="allows 1..3"):
        student_from_teacher(teacher, 4)


def test_distill_end_to_end_and_export(tmp_path, minilm_dir):
    import transformers

    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    BertForPreTraining(
        BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)
    ).save_pretrained(teacher_dir)
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(teacher_dir)
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(p) for p in stdlib_documents(limit_bytes=30_000)))
    prepare(
        [str(tmp_path / "c.txt")],
        tmp_path / "data",
        PrepareOptions(vocab=str(teacher_dir / "vocab.txt"), seq_len=64),
        progress=False,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbert",
            "distill",
            "--teacher",
            str(teacher_dir),
            "--student-layers",
            "2",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "student"),
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--warmup",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    ours = BertForPreTraining.from_pretrained(tmp_path / "student").eval()
    assert ours.config.num_hidden_layers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "student")).eval()
    ids = torch.randint(1000, 20000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).prediction_logits, hf(ids).prediction_logits, rtol=1e-4, atol=1e-4)
