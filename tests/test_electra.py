"""ELECTRA pretraining (fastbert.electra, pretrain --objective electra): the loss and every gradient against
transformers' ElectraForMaskedLM + ElectraForPreTraining holding the same weights on the same replacement draws,
draws that do not depend on world size or loader workers, the export loaded by transformers and fine-tuned, and the
CLI on real text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ports import torchrun

from fastbert import hf, ops
from fastbert.config import IGNORE_INDEX, BertConfig
from fastbert.data.masking import MaskingCollator
from fastbert.data.sampler import MicroBatchPlan
from fastbert.data.shards import Sample, ShardDataset
from fastbert.electra import ElectraForPreTraining, ReplacementKeys, generator_config
from fastbert.model import BertForPreTraining, BertForSequenceClassification

transformers = pytest.importorskip("transformers")

SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
MASK = 4
CONFIG = BertConfig(
    vocab_size=211,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    sentence_objective="none",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMINGS = {"tokens_per_s", "samples_per_s", "mfu", "time", "wall", "max_memory_gb"}


def _samples(count: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(6, 30, size=count):
        ids = np.concatenate([[2], rng.integers(5, CONFIG.vocab_size, size=length - 2), [3]])
        out.append(Sample(ids.astype(np.int64), np.zeros(length, dtype=np.int64), -1))
    return out


def _batch(count: int = 5, seed: int = 0) -> dict:
    collate = ReplacementKeys(MaskingCollator(CONFIG.vocab_size, SPECIAL, MASK, seed=seed), seed)
    return collate(_samples(count, seed), np.arange(count), np.zeros(count, dtype=np.int64))


def _padded(flat: torch.Tensor, cu_seqlens: torch.Tensor, fill: int) -> torch.Tensor:
    lengths = cu_seqlens.diff().tolist()
    rows = [flat[int(s) : int(s) + n] for s, n in zip(cu_seqlens[:-1], lengths, strict=True)]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def _model(dtype=torch.float64) -> ElectraForPreTraining:
    torch.manual_seed(0)
    model = ElectraForPreTraining(CONFIG, generator_config(CONFIG, 0.5, 1))
    with torch.no_grad():  # away from BERT's initialisation, so that no gradient is trivially zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)  # float32 values, which the (float32) export holds exactly


def _hf_models(model: ElectraForPreTraining, directory: Path, dtype=torch.float64):
    model.save_pretrained(directory)
    discriminator = transformers.ElectraForPreTraining.from_pretrained(str(directory), dtype=dtype).eval()
    generator = transformers.ElectraForMaskedLM.from_pretrained(str(directory / "generator"), dtype=dtype).eval()
    return discriminator, generator


def test_loss_and_every_gradient_equal_transformers_on_the_same_draws(tmp_path):
    model = _model()
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "position_ids", "labels", "cu_seqlens")}
    out = model(
        **inputs,
        max_seqlen=batch["max_seqlen"],
        masked_positions=batch["masked_positions"],
        replacement_keys=batch["replacement_keys"],
    )
    out.loss.backward()
    hd, hg = _hf_models(model, tmp_path / "hf")

    cu = batch["cu_seqlens"]
    attention = _padded(torch.ones_like(batch["input_ids"]), cu, 0)
    masked_ids, labels = _padded(batch["input_ids"], cu, 0), _padded(batch["labels"], cu, IGNORE_INDEX)
    corrupted = _padded(out.corrupted_ids, cu, 0)
    real = attention.bool()
    # The draws: only masked positions change, and a label says whether the token differs from the original.
    original = torch.where(labels != IGNORE_INDEX, labels, masked_ids)
    assert torch.equal(corrupted[labels == IGNORE_INDEX], masked_ids[labels == IGNORE_INDEX])
    replaced = (corrupted != original) & real
    assert torch.equal(_padded(out.replaced, cu, 0).bool(), replaced)
    assert int(replaced.sum()) > 0

    generator_logits = hg(masked_ids, attention_mask=attention).logits
    # Each masked position holds the draw of its own row, keyed by its own key, from transformers' generator.
    chosen = labels != IGNORE_INDEX
    with torch.no_grad():
        head = hg.generator_predictions(hg.electra(masked_ids, attention_mask=attention).last_hidden_state)[chosen]
        _, _, draws = ops.mlm_loss_and_sample(
            head, hg.generator_lm_head.weight, hg.generator_lm_head.bias, labels[chosen], batch["replacement_keys"]
        )
    assert torch.equal(corrupted[chosen], draws)
    generator_loss = F.cross_entropy(generator_logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    discriminator_logits = hd(corrupted, attention_mask=attention).logits
    discriminator_loss = F.binary_cross_entropy_with_logits(discriminator_logits[real], replaced[real].double())
    reference = generator_loss + 50.0 * discriminator_loss
    reference.backward()
    torch.testing.assert_close(out.mlm_loss, generator_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.discriminator_loss, discriminator_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)

    # Each of our parameters' gradient is the sum of the gradients of every HF parameter holding it (the shared
    # embeddings are in both HF models; the fused QKV is HF's query, key and value).
    expected: dict[int, torch.Tensor] = {}

    def add(param: torch.Tensor, grads: list[torch.Tensor]) -> None:
        g = torch.cat(grads) if len(grads) > 1 else grads[0]
        expected[id(param)] = expected[id(param)] + g if id(param) in expected else g

    for ours, theirs in ((model.discriminator, hd), (model.generator, hg)):
        for key, names in hf.checkpoint_key_map(ours, "electra").items():
            add(ours.get_parameter(key), [theirs.get_parameter(n).grad for n in names])
    heads = {
        model.discriminator_head.dense.weight: hd.discriminator_predictions.dense.weight,
        model.discriminator_head.dense.bias: hd.discriminator_predictions.dense.bias,
        model.discriminator_head.prediction.weight: hd.discriminator_predictions.dense_prediction.weight,
        model.discriminator_head.prediction.bias: hd.discriminator_predictions.dense_prediction.bias,
        model.generator_head.dense.weight: hg.generator_predictions.dense.weight,
        model.generator_head.dense.bias: hg.generator_predictions.dense.bias,
        model.generator_head.norm.weight: hg.generator_predictions.LayerNorm.weight,
        model.generator_head.norm.bias: hg.generator_predictions.LayerNorm.bias,
        model.generator_head.bias: hg.generator_lm_head.bias,
    }
    for ours, theirs in heads.items():
        add(ours, [theirs.grad])
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(expected) == set(names)  # every parameter compared
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-8, atol=1e-10, msg=name)


def test_a_draw_of_the_original_token_is_labelled_original():
    model = _model().eval()
    batch = _batch(3)
    targets = batch["masked_labels"]
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "masked_positions")}
    kwargs.update(max_seqlen=batch["max_seqlen"], replacement_keys=batch["replacement_keys"])
    # Every masked position's label made one token t; a huge bias on t makes the generator draw t everywhere.
    t = int(targets[0])
    kwargs["labels"] = torch.where(batch["labels"] != IGNORE_INDEX, t, IGNORE_INDEX)
    original = batch["input_ids"].index_copy(0, batch["masked_positions"], torch.full_like(targets, t))
    kwargs["input_ids"] = torch.where(batch["labels"] != IGNORE_INDEX, MASK, original)
    with torch.no_grad():
        model.generator_head.bias[t] = 1e4
        out = model(**kwargs)
    assert torch.equal(out.corrupted_ids, original)
    assert int(out.replaced.sum()) == 0 and int(out.discriminator_counts[3]) == 0
    # Drawing another token u instead: exactly the masked positions are replaced.
    with torch.no_grad():
        model.generator_head.bias[t] = 0
        model.generator_head.bias[t + 1] = 1e4
        out = model(**kwargs)
    assert torch.equal(out.replaced.bool(), kwargs["labels"] != IGNORE_INDEX)


def test_the_sampling_temperature_reaches_the_draw(monkeypatch):
    """BERT's and DeBERTa's ELECTRA pass their ``sampling_temperature`` to the fused draw (whose draws follow
    ``softmax(logits / T)``: tests/kernels/test_mlm_sample.py), and a hotter draw replaces other tokens."""
    from fastbert.deberta import DebertaConfig
    from fastbert.deberta_electra import DebertaElectraForPreTraining

    seen = []
    draw = ops.mlm_loss_and_sample

    def spy(*args):
        seen.append(args[5])
        return draw(*args)

    monkeypatch.setattr(ops, "mlm_loss_and_sample", spy)
    batch = _batch(4)
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "masked_positions")}
    kwargs.update(max_seqlen=batch["max_seqlen"], replacement_keys=batch["replacement_keys"])
    deberta = DebertaConfig.preset("deberta-tiny", vocab_size=CONFIG.vocab_size)
    for build in (
        lambda t: ElectraForPreTraining(CONFIG, generator_config(CONFIG, 0.5, 1), sampling_temperature=t),
        lambda t: DebertaElectraForPreTraining(deberta, deberta.replace(num_hidden_layers=1), sampling_temperature=t),
    ):
        corrupted = []
        for t in (1.0, 4.0):
            torch.manual_seed(0)
            with torch.no_grad():
                corrupted.append(build(t).eval()(**kwargs).corrupted_ids)
        assert seen[-2:] == [1.0, 4.0]
        assert not torch.equal(*corrupted)


def test_replacement_keys_do_not_depend_on_world_size_or_micro_batch():
    samples = _samples(40, seed=3)
    collate = ReplacementKeys(MaskingCollator(CONFIG.vocab_size, SPECIAL, MASK, seed=7), 7)

    def keyed(world: int, micro: int) -> dict[tuple[int, int, int], int]:
        """(step, sample, position) -> key over every rank's micro-batches of 6 steps."""
        found = {}
        for rank in range(world):
            plan = MicroBatchPlan(len(samples), 8, micro, seed=7, rank=rank, world_size=world)
            for position in range(6 * plan.accumulation):
                indices, epochs = plan.indices(position)
                b = collate([samples[i] for i in indices], indices, epochs)
                sequence = np.repeat(np.arange(len(indices)), b["cu_seqlens"].diff().numpy())
                for m, key in zip(b["masked_positions"].tolist(), b["replacement_keys"].tolist(), strict=True):
                    step = position // plan.accumulation
                    found[(step, int(indices[sequence[m]]), int(b["position_ids"][m]))] = key
        return found

    one = keyed(1, 8)
    assert len(set(one.values())) == len(one)  # distinct draws
    assert keyed(2, 2) == one and keyed(4, 1) == one


def test_export_loads_in_transformers_and_into_fastbert_with_the_same_logits(tmp_path):
    model = _model(torch.float32).eval()
    hd, hg = _hf_models(model, tmp_path / "hf", torch.float32)
    batch = _batch(4, seed=1)
    cu = batch["cu_seqlens"]
    ids, attention = _padded(batch["input_ids"], cu, 0), _padded(torch.ones_like(batch["input_ids"]), cu, 0)
    real = attention.bool()
    with torch.no_grad():
        hidden = model.discriminator(ids, attention).last_hidden_state
        torch.testing.assert_close(
            hd(ids, attention_mask=attention).logits[real], model.discriminator_head(hidden)[real], atol=2e-5, rtol=0
        )
        hidden = model.generator(ids, attention).last_hidden_state
        theirs = hg(ids, attention_mask=attention).logits[real]
        ours = F.linear(model.generator_head(hidden), model.decoder_weight, model.generator_head.bias)[real]
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
        # fastbert's loader reads both: the generator as an MLM, the discriminator's encoder under a task head.
        mlm = BertForPreTraining.from_pretrained(tmp_path / "hf" / "generator").eval()
        torch.testing.assert_close(mlm(ids, attention).prediction_logits[real], theirs, atol=2e-5, rtol=0)
        classifier, info = BertForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
        assert sorted(info.missing_keys) == [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "classifier.bias",
            "classifier.weight",
        ]
        assert all(k.startswith("discriminator_predictions.") for k in info.unexpected_keys)
        encoded = classifier.eval().bert(ids, attention).last_hidden_state
        torch.testing.assert_close(
            encoded[real], hd.electra(ids, attention_mask=attention).last_hidden_state[real], atol=2e-5, rtol=0
        )


# The CLI on real text --------------------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    import os

    result = subprocess.run([*args], capture_output=True, text=True, env={**os.environ, **ENV}, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def kjv(tmp_path_factory, vocab_path) -> dict[str, Path]:
    """Shards without a sentence objective from the King James Bible, with the bert-base-uncased vocabulary."""
    if shutil.which("bible") is None:
        pytest.skip("the `bible` program (Debian bible-kjv) is not installed")
    root = tmp_path_factory.mktemp("electra")
    text = subprocess.run(["bible", "-f", "gen1:1-gen10:32"], capture_output=True, check=True).stdout.decode()
    verses = [line.split(" ", 1)[1] for line in text.splitlines() if " " in line]
    (root / "kjv.txt").write_text("\n\n".join(" ".join(verses[i : i + 8]) for i in range(0, len(verses), 8)) + "\n")
    model = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    (root / "model.json").write_text(json.dumps({**model, "vocab_size": 30522, "max_position_embeddings": 64}))
    fastbert = (sys.executable, "-m", "fastbert")
    _cli(
        *fastbert,
        "prepare-data",
        "--vocab",
        str(vocab_path),
        "--out",
        str(root / "data"),
        "--seq-len",
        "64",
        "--objective",
        "none",
        str(root / "kjv.txt"),
    )
    _cli(
        *fastbert,
        "prepare-data",
        "--vocab",
        str(vocab_path),
        "--out",
        str(root / "nsp"),
        "--seq-len",
        "64",
        "--objective",
        "nsp",
        str(root / "kjv.txt"),
    )
    return {"root": root, "data": root / "data", "nsp": root / "nsp", "model": root / "model.json"}


def _pretrain(kjv, out: Path, *extra: str, launcher=(sys.executable, "-m", "fastbert")) -> Path:
    _cli(
        *launcher,
        "pretrain",
        "--objective",
        "electra",
        "--model",
        str(kjv["model"]),
        "--data",
        str(kjv["data"]),
        "--out",
        str(out),
        "--global-batch",
        "8",
        "--micro-batch",
        "2",
        "--steps",
        "3",
        "--lr",
        "2e-3",
        "--warmup",
        "1",
        "--no-progress",
        "--dropout",
        "0",
        *extra,
    )
    return out


@pytest.fixture(scope="module")
def electra_run(kjv) -> Path:
    return _pretrain(kjv, kjv["root"] / "run")


def test_pretrain_electra_logs_the_generator_and_the_discriminator(electra_run):
    rows = _rows(electra_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for name in (
            "generator_loss",
            "generator_accuracy",
            "discriminator_loss",
            "discriminator_accuracy",
            "discriminator_precision",
            "discriminator_recall",
        ):
            assert np.isfinite(r[name]), (name, r)
        assert r["loss"] == pytest.approx(r["generator_loss"] + 50 * r["discriminator_loss"], rel=1e-12)
        assert 0 < r["replaced_fraction"] < 0.15
        assert 0 <= r["discriminator_accuracy"] <= 1
    # A fresh generator predicts the shards' unigram distribution (not ln 30,522 = 10.3), and a fresh discriminator
    # the expected replaced share: its loss is that share's binary entropy (not ln 2).
    # (test_priors.py checks the unigram level closely, on more masks than one step's.)
    assert rows[0]["generator_loss"] < np.log(30522) - 3
    share = rows[0]["replaced_fraction"]
    assert rows[0]["discriminator_loss"] == pytest.approx(
        -share * np.log(share) - (1 - share) * np.log(1 - share), abs=0.05
    )


def test_replacements_are_the_same_with_loader_workers_and_on_two_ranks(kjv, electra_run, tmp_path):
    straight = _rows(electra_run)
    workers = _rows(_pretrain(kjv, tmp_path / "workers", "--loader-workers", "2"))
    assert workers == straight  # the same batches and draws: bitwise the same run
    ranks = _rows(_pretrain(kjv, tmp_path / "ranks", launcher=torchrun(2)))
    # Step 1 starts from the same weights, so its draws and hence its replaced tokens are the same; later steps
    # follow within rounding (the ranks sum gradients in another order).
    assert ranks[0]["replaced_fraction"] == straight[0]["replaced_fraction"]
    for a, b in zip(ranks, straight, strict=True):
        for key in ("loss", "generator_loss", "discriminator_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_electra_export_is_read_by_transformers_and_fine_tuned(kjv, electra_run, tmp_path):
    out = tmp_path / "hf"
    _cli(sys.executable, "-m", "fastbert", "export", str(electra_run), "--out", str(out))
    for directory in (out, out / "generator"):
        for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
            assert (directory / name).exists(), directory / name
    hd = transformers.ElectraForPreTraining.from_pretrained(str(out)).eval()
    hg = transformers.ElectraForMaskedLM.from_pretrained(str(out / "generator")).eval()
    config = BertConfig.from_json_file(electra_run / "config.json")
    generator = BertConfig.from_json_file(electra_run / "generator_config.json")
    ours = ElectraForPreTraining(config, generator).eval()
    trained = torch.load(next((electra_run / "checkpoints" / "step-00000003").glob("mp_rank_*")), weights_only=False)
    ours.load_state_dict(trained["module"])
    data = ShardDataset(kjv["data"])
    collate = ReplacementKeys(MaskingCollator(30522, list(data.special_ids.values()), data.special_ids["mask"]), 0)
    batch = collate([data[i] for i in range(4)], np.arange(4), np.zeros(4, dtype=np.int64))
    cu = batch["cu_seqlens"]
    ids, attention = _padded(batch["input_ids"], cu, 0), _padded(torch.ones_like(batch["input_ids"]), cu, 0)
    real = attention.bool()
    with torch.no_grad():
        hidden = ours.discriminator(ids, attention).last_hidden_state
        torch.testing.assert_close(
            hd(ids, attention_mask=attention).logits[real], ours.discriminator_head(hidden)[real], atol=1e-4, rtol=0
        )
        hidden = ours.generator(ids, attention).last_hidden_state
        logits = F.linear(ours.generator_head(hidden), ours.decoder_weight, ours.generator_head.bias)
        torch.testing.assert_close(hg(ids, attention_mask=attention).logits[real], logits[real], atol=1e-4, rtol=0)

    rows = [
        {"text": " ".join(line.split()[:12]), "label": "long" if len(line) > 60 else "short"}
        for line in (kjv["root"] / "kjv.txt").read_text().split(".")[:24]
        if line.strip()
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli(
        sys.executable,
        "-m",
        "fastbert",
        "finetune",
        "--task",
        "classify",
        "--model",
        str(out),
        "--train",
        str(tmp_path / "train.jsonl"),
        "--out",
        str(tmp_path / "ft"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--no-progress",
    )
    logged = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert logged and np.isfinite(logged[-1]["train_loss"])


def test_electra_on_sentence_pair_shards_is_refused(kjv, tmp_path):
    import os

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbert",
            "pretrain",
            "--objective",
            "electra",
            "--model",
            str(kjv["model"]),
            "--data",
            str(kjv["nsp"]),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )
    assert result.returncode == 1
    assert "--objective electra needs shards without a sentence objective" in result.stderr
    assert "'nsp'" in result.stderr


def test_plot_draws_an_electra_run(electra_run):
    """``fastbert plot`` reads ELECTRA's rows (generator and discriminator accuracy, no MLM accuracy)."""
    out = electra_run / "electra-curves.png"
    _cli(sys.executable, "-m", "fastbert", "plot", str(electra_run), "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
