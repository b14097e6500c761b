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
from fastbert.train.pretrain import PretrainArgs, TrainingSetupError, _generator_config, _model_config

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
STEPS = ("--global-batch", "16", "--micro-batch", "8", "--steps", "4", "--save-every", "2")


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
    assert len(losses_a) == 4 and losses_a == pytest.approx(losses_b, rel=1e-5)
    assert all(m["grad_norm"] > 0 and not m["skipped"] for m in _metrics(straight))


def test_a_resumed_run_is_bitwise_the_straight_one(setup, straight, tmp_path):
    """The straight run's step-2 checkpoint, alone in a copy of its run directory, resumed with --resume auto."""
    out = tmp_path / "resumed"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002")
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
        ({"objective": "electra", "generator_size": 0.25}, "none", "same width: --generator-size must be 1, got 0.25"),
        ({}, "nsp", "shards prepared for the sentence objective 'nsp', but DeBERTa has none"),
        ({"pre_ln": True}, "none", "--pre-ln with --model deberta-tiny: DeBERTa is post-LN"),
    ],
)
def test_what_deberta_cannot_train_is_refused_naming_the_flag_or_data(change, objective, message):
    args = PretrainArgs(data="shards", out="run", model="deberta-tiny", **change)
    with pytest.raises(TrainingSetupError, match=message):
        _generator_config(args, _model_config(args, 30522, objective, 128))


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


# ELECTRA: replaced-token detection with gradient-disentangled embedding sharing -------------------------------------
@pytest.fixture(scope="module")
def electra_run(setup, tmp_path_factory) -> Path:
    return _pretrain(setup, tmp_path_factory.mktemp("electra") / "run", 1, "--objective", "electra")


def test_an_electra_resume_repeats_the_straight_run(setup, electra_run, tmp_path):
    """ZeRO for the pair is the optimizer's, tested on the MLM model above and on BERT's ELECTRA."""
    a = consolidated_state_dict(checkpoint.resolve(electra_run))
    assert "embedding_delta" in a and a["embedding_delta"].abs().max() > 0  # the discriminator's own share moved
    out = tmp_path / "resumed"
    shutil.copytree(electra_run, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002")
    _pretrain(setup, out, 1, "--objective", "electra", "--resume", "auto")
    final = consolidated_state_dict(checkpoint.resolve(out))
    assert all(torch.equal(final[k], a[k]) for k in a)


def test_electra_losses_are_transformers_on_the_export_and_sharing_stops_the_gradient(electra_run, tmp_path):
    """One forward pass of the trained pair on a padded batch, against transformers' generator
    (``DebertaV2ForMaskedLM``) and discriminator encoder (``DebertaV2Model``) loaded from the export, with the
    detection head applied by hand; then the gradients of embedding sharing: the discriminator's loss reaches its
    own delta but never the generator's table."""
    transformers = pytest.importorskip("transformers")
    import torch.nn.functional as F

    from fastbert.config import read_model_config
    from fastbert.deberta_electra import DebertaElectraForPreTraining

    ckpt = checkpoint.resolve(electra_run)
    config = read_model_config(ckpt / "config.json").replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    generator = read_model_config(ckpt / "generator_config.json").replace(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    assert generator.num_hidden_layers == 1 and generator.hidden_size == config.hidden_size  # half the depth
    model = DebertaElectraForPreTraining(config, generator)
    model.load_state_dict({k: v.float() for k, v in consolidated_state_dict(ckpt).items()})
    out_dir = export(electra_run, tmp_path / "export")
    gen = transformers.DebertaV2ForMaskedLM.from_pretrained(out_dir / "generator").eval()
    disc = transformers.DebertaV2Model.from_pretrained(out_dir).eval()
    gen.config.hidden_dropout_prob = disc.config.hidden_dropout_prob = 0.0
    lengths = [64, 30, 9]
    gen_rng = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 30000, (3, 64), generator=gen_rng)
    mask = torch.arange(64)[None, :] < torch.tensor(lengths)[:, None]
    chosen = mask & (torch.rand(ids.shape, generator=gen_rng) < 0.3)
    labels = torch.where(chosen, ids, -100)
    inputs = ids.masked_fill(chosen, 103)
    keys = torch.arange(int(chosen.sum()), dtype=torch.int64) * 1_000_003 + 17
    out = model(inputs, mask.long(), labels=labels, replacement_keys=keys)
    with torch.no_grad():
        mlm = gen(input_ids=inputs, attention_mask=mask.long(), labels=labels).loss
        hidden = disc(input_ids=out.corrupted_ids, attention_mask=mask.long()).last_hidden_state
        head = model.discriminator_head
        h = F.layer_norm(F.gelu(F.linear(hidden, head.dense.weight, head.dense.bias)), (hidden.shape[-1],),
                         head.norm.weight, head.norm.bias, config.layer_norm_eps)  # fmt: skip
        logits = F.linear(h, head.classifier.weight, head.classifier.bias).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(logits[mask], out.replaced[mask].float())
    torch.testing.assert_close(out.mlm_loss, mlm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.discriminator_logits[mask], logits[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.discriminator_loss, bce, atol=1e-5, rtol=1e-5)
    assert out.replaced.sum() > 0
    out.discriminator_loss.backward()
    assert model.generator.embeddings.word_embeddings.weight.grad is None
    assert model.embedding_delta.grad.abs().sum() > 0


def test_electra_started_from_an_mlm_checkpoint_takes_its_encoder_and_embeddings(setup, straight, tmp_path):
    """``--objective electra --init-from`` the MLM run (another dropout, which the weights do not depend on): at a
    zero learning rate its one step leaves the start as it was, so the checkpoint holds what the run started from.
    The discriminator's encoder is the MLM model's, the shared table ``E_G`` its word embeddings with the delta at
    zero; the generator's layer and both heads are fresh."""
    run = _pretrain(
        setup, tmp_path / "warm", 1, "--objective", "electra", "--init-from", str(straight), "--lr", "0",
        "--steps", "1", "--dropout", "0.1",
    )  # fmt: skip
    mlm = consolidated_state_dict(checkpoint.resolve(straight))
    pair = consolidated_state_dict(checkpoint.resolve(run))
    encoder = [k for k in mlm if k.startswith("deberta.") and "word_embeddings" not in k]
    assert len(encoder) > 30
    assert all(torch.equal(pair["discriminator." + k[len("deberta.") :]], mlm[k]) for k in encoder)
    assert torch.equal(
        pair["generator.embeddings.word_embeddings.weight"], mlm["deberta.embeddings.word_embeddings.weight"]
    )
    assert not pair["embedding_delta"].any()
    fresh = pair["generator.encoder.layers.0.query.weight"], mlm["deberta.encoder.layers.0.query.weight"]
    assert fresh[0].shape == fresh[1].shape and not torch.equal(*fresh)
    assert not torch.equal(pair["generator_head.transform.weight"], mlm["cls.transform.weight"])


def test_electra_from_an_mlm_checkpoint_of_another_shape_is_refused_naming_it(straight):
    """The config check names the field that differs (dropout may differ); a model the weights do not fit is refused
    naming ``--init-from``, before DeepSpeed starts."""
    from fastbert.config import read_model_config
    from fastbert.deberta_electra import DebertaElectraForPreTraining, generator_config
    from fastbert.train.pretrain import WARM_START_FREE, _checkpoint_config, warm_start_electra

    source = checkpoint.resolve(straight)
    saved = read_model_config(source / "config.json")
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    _checkpoint_config(source, saved.replace(hidden_dropout_prob=0.3), vocab, source, 64, free=WARM_START_FREE)
    wider = saved.replace(intermediate_size=256)
    with pytest.raises(TrainingSetupError, match="intermediate_size: checkpoint 128 vs run 256"):
        _checkpoint_config(source, wider, vocab, source, 64, free=WARM_START_FREE)
    with pytest.raises(TrainingSetupError, match=f"--init-from {source}: its encoder does not fit"):
        warm_start_electra(DebertaElectraForPreTraining(wider, generator_config(wider, None, 1)), source)
