"""The task registry is the one list of fine-tuning tasks: ``--task`` offers exactly its names, every task brings
its head, main metric and the methods the loop calls, the loop names no task, and a task defined here (one class,
one registry entry, nothing else changed) runs through ``fastbert finetune`` end to end."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import fastbert.train.finetune as finetune_module
from fastbert import BertConfig, BertForPreTraining, BertForSequenceClassification
from fastbert.data.corpus import stdlib_documents
from fastbert.model import BertPreTrainedModel
from fastbert.tasks import TASKS, Task, formats, metrics
from fastbert.tokenizer import WordPieceTokenizer
from fastbert.train.finetune import FinetuneArgs


def test_task_choices_are_the_registry():
    from fastbert import cli

    parser = cli.build_parser()
    command = parser._subparsers._group_actions[0].choices["finetune"]
    cli.options.add_pending_arguments(command)
    (task_flag,) = [a for a in command._actions if "--task" in a.option_strings]
    assert list(task_flag.choices) == list(TASKS) == ["classify", "pair", "regress", "ner", "qa"]
    with pytest.raises(ValueError, match=r"--task must be one of \('classify', 'pair', 'regress', 'ner', 'qa'\)"):
        FinetuneArgs(task="tag", model="m", train="t", out="o")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_brings_its_head_metric_and_methods(name):
    task = TASKS[name]
    assert task.name == name and issubclass(task, Task)
    assert issubclass(task.head, BertPreTrainedModel)
    assert isinstance(task.main_metric, str) and task.main_metric
    for method in ("read", "collate", "decode", "metrics"):
        assert getattr(task, method) is not getattr(Task, method), f"{name} does not implement {method}"


def test_labels_apply_only_to_tasks_with_a_label_set():
    labelled = [name for name, task in TASKS.items() if task.labelled]
    assert labelled == ["classify", "pair", "ner"]
    with pytest.raises(ValueError, match=r"--labels applies to --task classify, pair, ner, not qa"):
        FinetuneArgs(task="qa", model="m", train="t", out="o", labels="a,b")
    assert FinetuneArgs(task="pair", model="m", train="t", out="o").pair_column == "text_b"


def test_the_loop_names_no_task():
    """finetune.py holds no string that is a task's name: what differs between tasks lives in the tasks."""
    tree = ast.parse(Path(finetune_module.__file__).read_text())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & set(TASKS)


class WordCountTask(Task):
    """A task the loop has never seen: a plain .txt file, one text per line, labelled "short" or "long" by its
    number of words; accuracy over the two."""

    name = "word-count"
    head = BertForSequenceClassification
    main_metric = "accuracy"
    label_set = ["short", "long"]

    @classmethod
    def head_config(cls, label_names):
        return {"num_labels": 2, "id2label": dict(enumerate(cls.label_set))}

    def read(self, path, labelled=True):
        lines = Path(path).read_text().splitlines()
        return [
            formats.TextExample(line, None, "long" if len(line.split()) > 8 else "short", f"{path}:{n}")
            for n, line in enumerate(lines, 1)
        ]

    def collate(self, batch, with_labels=True):
        encoded = self.tokenizer([ex.text for ex in batch], max_length=32, truncation=True, padding="longest")
        out = {k: torch.tensor(encoded[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
        if with_labels:
            out["labels"] = torch.tensor([self.label_set.index(ex.label) for ex in batch])
        return out

    def decode(self, model, examples, features, outputs, with_scores):
        names = self.model_labels(model)
        labels = [names[int(logits.argmax())] for logits in outputs]
        if not with_scores:
            return labels
        return [(label, {"logits": logits.tolist()}) for label, logits in zip(labels, outputs, strict=True)]

    def metrics(self, examples, predictions):
        return {"accuracy": metrics.classification_metrics([ex.label for ex in examples], predictions)["accuracy"]}


@pytest.fixture
def small_model(tmp_path, minilm_dir) -> Path:
    torch.manual_seed(0)
    BertForPreTraining(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "model")
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_task_added_in_one_place_runs_end_to_end(monkeypatch, small_model, tmp_path):
    from fastbert import cli

    monkeypatch.setitem(TASKS, WordCountTask.name, WordCountTask)
    paragraphs = [p for doc in stdlib_documents(limit_bytes=60_000) for p in doc]
    texts = [" ".join(p.split()[: 4 + k % 12]) for k, p in enumerate(paragraphs[:120])]
    assert len(texts) == 120
    (tmp_path / "train.txt").write_text("\n".join(texts[:80]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(texts[80:]) + "\n")
    out = tmp_path / "out"
    argv = ["finetune", "--task", "word-count", "--model", str(small_model), "--train", str(tmp_path / "train.txt")]
    argv += ["--eval", str(tmp_path / "eval.txt"), "--predict", str(tmp_path / "eval.txt"), "--out", str(out)]
    assert cli.main([*argv, "--epochs", "2", "--lr", "1e-3", "--batch-size", "16", "--no-progress"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["task"] == "word-count" and 0 <= results["eval_accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all("eval_accuracy" in row for row in rows)
    assert max(row["eval_accuracy"] for row in rows) == results["eval_accuracy"]
    assert json.loads((out / "best" / "config.json").read_text())["id2label"] == {"0": "short", "1": "long"}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 40 and all(p["prediction"] in ("short", "long") for p in predictions)
    assert all(len(p["logits"]) == 2 for p in predictions)
    assert not (out / "state").exists()
