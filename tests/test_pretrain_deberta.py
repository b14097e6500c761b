"""``fastbert pretrain --model deberta-*``: DeBERTa-v3 MLM pretraining through the public CLI, at the real vocabulary
size (bert-base-uncased, 30,522 words), with BERT's guarantees: ZeRO-0 on one process and ZeRO-2 on two ranks give
the same weights, a resumed run is bitwise the straight one, the export is transformers' ``DebertaV2ForMaskedLM``
with the same logits, and what DeBERTa cannot train is refused before the start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import torchrun

from fastbert.deberta import DebertaForMaskedLM
from fastbert.train import checkpoint
from fastbert.train.export import consolidated_state_dict, export
from fastbert.train.pretrain import PretrainArgs, TrainingSetupError, _model_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMALL = {
    "model_type": "deberta-v2",
    "vocab_size": 30522,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "position_buckets": 16,  # shorter than the 64-token samples: the log buckets are trained
    "max_relative_positions": 64,
    "relative_attention": True,
    "position_biased_input": False,
    "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
}
STEPS = ("--global-batch", "16", "--micro-batch", "8", "--steps", "6", "--save-every", "3")


def _cli(args: list[str], world: int = 1) -> subprocess.CompletedProcess:
    launcher = torchrun(world) if world > 1 else (sys.executable, "-m", "fastbert")
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory, vocab_path) -> tuple[Path, Path]:
    """Packed-text shards (no sentence objective) of the standard library's docstrings, and the model's config."""
    from fastbert.data.corpus import stdlib_documents

    root = tmp_path_factory.mktemp("deberta-pretrain")
    docs = [" ".join(p) for p in stdlib_documents(limit_bytes=60_000)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    data = root / "data"
    _cli(
        [
            *("prepare-data", "--vocab", str(vocab_path), "--out", str(data), "--seq-len", "64"),
            *("--objective", "none", str(root / "corpus.txt")),
        ]
    )
    (root / "small.json").write_text(json.dumps(SMALL))
    return data, root / "small.json"


def _pretrain(setup, out: Path, world: int, *extra: str) -> Path:
    data, model = setup
    _cli(
        [
            *("pretrain", "--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "64"),
            *("--dropout", "0", "--precision", "fp32", "--lr", "1e-3", "--warmup", "2", "--no-progress"),
            *STEPS,
            *extra,
        ],
        world=world,
    )
    return out


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory) -> Path:
    return _pretrain(setup, tmp_path_factory.mktemp("z0w1") / "run", 1)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_zero2_on_two_ranks_gives_the_weights_of_one_process(setup, straight, tmp_path):
    sharded = _pretrain(setup, tmp_path / "z2w2", 2, "--zero-stage", "2")
    a = consolidated_state_dict(checkpoint.resolve(straight))
    b = consolidated_state_dict(checkpoint.resolve(sharded))
    assert a.keys() == b.keys() and len(a["deberta.embeddings.word_embeddings.weight"]) == 30522
    for key in a:
        # As for BERT (tests/test_exactness.py): 1e-5 of a tensor's size for the trust-ratio group, 1e-4 for the
        # tensors that take Adam's step (a reduction in another order shows at the size of the step).
        scale = a[key].abs().max().item()
        gap = (a[key].double() - b[key].double()).abs().max().item() / max(scale, 1e-30)
        assert gap <= (1e-4 if a[key].ndim == 1 else 1e-5), (key, gap)
    losses_a, losses_b = [m["loss"] for m in _metrics(straight)], [m["loss"] for m in _metrics(sharded)]
    assert len(losses_a) == 6 and losses_a == pytest.approx(losses_b, rel=1e-5)
    assert losses_a[-1] < losses_a[0]


def test_a_resumed_run_is_bitwise_the_straight_one(setup, straight, tmp_path):
    """The straight run's step-3 checkpoint, alone in a copy of its run directory, resumed with --resume auto."""
    out = tmp_path / "resumed"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").write_text("step-00000003")
    _pretrain(setup, out, 1, "--resume", "auto")
    final = consolidated_state_dict(checkpoint.resolve(out))
    reference = consolidated_state_dict(checkpoint.resolve(straight))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    keys = ("loss", "mlm_accuracy", "grad_norm", "lr")
    assert [[m[k] for k in keys] for m in _metrics(out)] == [[m[k] for k in keys] for m in _metrics(straight)]


def test_the_export_is_transformers_deberta_with_the_same_logits(straight, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export(straight, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deberta-v2" and config["architectures"] == ["DebertaV2ForMaskedLM"]
    assert (out / "vocab.txt").exists()
    ids = torch.randint(1000, 30000, (2, 100), generator=torch.Generator().manual_seed(0))  # past the buckets
    with torch.no_grad():
        ours = DebertaForMaskedLM.from_pretrained(out).eval()(ids).logits
        theirs = transformers.DebertaV2ForMaskedLM.from_pretrained(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, objective, message",
    [
        ({"objective": "electra"}, "none", "--objective electra .* is not built yet"),
        ({}, "nsp", "shards prepared for the sentence objective 'nsp', but DeBERTa has none"),
        ({"pre_ln": True}, "none", "--pre-ln with --model deberta-tiny: DeBERTa is post-LN"),
    ],
)
def test_what_deberta_cannot_train_is_refused_naming_the_flag_or_data(change, objective, message):
    args = PretrainArgs(data="shards", out="run", model="deberta-tiny", **change)
    with pytest.raises(TrainingSetupError, match=message):
        _model_config(args, 30522, objective, 128)


def test_the_pretraining_forward_on_an_unpadded_batch_is_transformers_mlm_loss(tmp_path):
    """What the driver feeds (flat ids, ``cu_seqlens``, flat labels, ``masked_positions``) against transformers'
    ``DebertaV2ForMaskedLM`` on the same sequences padded, lengths past the log buckets and of one token."""
    transformers = pytest.importorskip("transformers")
    from fastbert.deberta import DebertaConfig, DebertaForPreTraining

    torch.manual_seed(0)
    config = DebertaConfig.from_dict({**SMALL, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = DebertaForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path).eval()
    lengths = [64, 37, 1, 20]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    labels = torch.where(mask & (torch.rand(ids.shape, generator=gen) < 0.3), ids, -100)
    labels[2, 0] = ids[2, 0]
    flat_labels = labels[mask]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        ours = model(
            ids[mask],
            cu_seqlens=cu,
            max_seqlen=max(lengths),
            labels=flat_labels,
            masked_positions=torch.nonzero(flat_labels != -100).flatten(),
        )
        theirs = hf(input_ids=ids, attention_mask=mask.long(), labels=labels)
        correct = (theirs.logits.argmax(-1) == labels)[labels != -100].float().mean()
    torch.testing.assert_close(ours.mlm_loss, theirs.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.mlm_accuracy, correct)
