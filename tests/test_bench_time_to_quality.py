"""The time-to-quality benchmark's own evaluation: its fixed masks and its held-out loss against a hand computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_time_to_quality as ttq  # noqa: E402

CLS, SEP, MASK, VOCAB = 101, 102, 103, 500


def stream(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(200, VOCAB, n)


def test_fixed_masks_are_fixed_and_follow_bert_rule():
    ids = stream(126 * 300 + 17)
    a = ttq.fixed_masks(ids, 128, CLS, SEP, MASK, VOCAB, seed=3)
    b = ttq.fixed_masks(ids, 128, CLS, SEP, MASK, VOCAB, seed=3)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert a.input_ids.shape == (300, 128)  # the 17-token tail is dropped
    assert (a.input_ids[:, 0] == CLS).all() and (a.input_ids[:, -1] == SEP).all()
    assert (a.labels[:, [0, -1]] == -100).all()
    chosen = a.labels != -100
    content = ids[: 126 * 300].reshape(300, 126)
    assert np.array_equal(a.labels[:, 1:-1][chosen[:, 1:-1]], content[chosen[:, 1:-1]])
    assert np.array_equal(a.input_ids[:, 1:-1][~chosen[:, 1:-1]], content[~chosen[:, 1:-1]])  # unscored: as given
    assert abs(chosen.sum() / content.size - 0.15) < 0.01
    masked = (a.input_ids == MASK) & chosen
    kept = (a.input_ids == a.labels) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.03
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.03  # plus the rare random token equal to the original
    other = ttq.fixed_masks(ids, 128, CLS, SEP, MASK, VOCAB, seed=4)
    assert not np.array_equal(a.labels, other.labels)


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return transformers.BertForMaskedLM(config)


def _deberta(tmp_path):
    """fastbert's DeBERTa export, as the benchmark's recipe row writes it (the v3 MLM head layout)."""
    from fastbert.deberta import DebertaConfig, DebertaForMaskedLM

    config = DebertaConfig.preset(
        "deberta-tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, position_buckets=16, max_relative_positions=64,
    )  # fmt: skip
    DebertaForMaskedLM(config).save_pretrained(tmp_path)
    return ttq.load_masked_lm(tmp_path)


@pytest.mark.parametrize("family", ["bert", "deberta"])
def test_held_out_loss_is_mean_cross_entropy_over_masked_positions(family, tmp_path):
    torch.manual_seed(0)
    model = (_bert() if family == "bert" else _deberta(tmp_path)).eval()
    masks = ttq.fixed_masks(stream(126 * 5), 128, CLS, SEP, MASK, VOCAB, seed=1)
    by_hand, count = 0.0, 0
    with torch.no_grad():
        for row, labels in zip(masks.input_ids, masks.labels, strict=True):
            logits = model(input_ids=torch.tensor(row)[None]).logits[0].double()
            for pos in np.flatnonzero(labels != -100):
                by_hand -= torch.log_softmax(logits[pos], -1)[labels[pos]].item()
                count += 1
    assert ttq.held_out_loss(model, masks, batch_size=2) == pytest.approx(by_hand / count, rel=1e-5)


def test_first_reach_takes_the_earliest_checkpoint_at_or_below_the_target():
    curve = [(10.0, 7.0), (20.0, 6.1), (30.0, 5.9), (40.0, 6.2)]
    assert ttq.first_reach(curve, 6.1) == 20.0
    assert ttq.first_reach(curve, 5.0) is None


def test_pace_from_separates_the_step_time_from_the_checkpoint_saves():
    # 12 steps of 2 s after a 5 s start-up; a save after steps 4 and 8 (and 12, after the last end) adds 3 s
    ends, t = [], 100.0 + 5.0
    for step in range(1, 13):
        t += 2.0 + (3.0 if step - 1 in (4, 8) else 0.0)
        ends.append(t)
    pace = ttq.pace_from(100.0, ends, save_every=4)
    assert pace.step_s == pytest.approx(2.0)
    assert pace.save_s == pytest.approx(3.0)
    assert pace.overhead_s == pytest.approx(5.0)
    assert ttq.pace_from(100.0, ends).save_s == 0.0  # no saves declared: nothing is taken for them


def test_the_trainer_replans_its_steps_and_schedule_from_its_own_pace():
    """At the end of the warmup the Trainer's run sets its step count, checkpoint spacing and linear decay from its
    own median step time: the decay reaches 0 at the new last step, the warmup's rates are untouched."""
    import time
    from functools import partial
    from types import SimpleNamespace

    import hf_trainer_pretrain as hf_run

    plan = hf_run.Replan(at=10, margin=0.97, warmup=10, checkpoints=4, save_s=2.0)
    now = time.time()
    timer = hf_run.StepTimer(deadline=now + 400.0, replan=plan)
    timer.times, timer.ends = [7.0] + [3.0] * 8, [now - 3.0 * i for i in range(9, 0, -1)]  # steps 1-9
    timer.last = time.perf_counter() - 3.0  # step 10 ends now, 3 s after step 9
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    lam = partial(
        transformers.optimization._get_linear_schedule_with_warmup_lr_lambda,
        num_warmup_steps=10,
        num_training_steps=400,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    state = SimpleNamespace(max_steps=400, save_steps=100, global_step=10)
    timer.on_step_end(None, state, SimpleNamespace(should_training_stop=False), lr_scheduler=scheduler)
    total = 10 + int(0.97 * (400.0 - 4 * 2.0) / 3.0)  # 3 s a step (the median; the first step's 7 s left out)
    assert state.max_steps == total == timer.replanned["steps"] and state.save_steps == total // 4
    assert timer.replanned["step_s"] == 3.0 and timer.replanned["steps_before"] == 400
    (rate,) = scheduler.lr_lambdas
    assert rate(5) == 0.5 and rate(10) == 1.0 and rate(total) == 0.0 and rate((10 + total) / 2) == pytest.approx(0.5)

    # The machine speeds up to 2 s a step: a tenth of the plan later the run plans again from its last 20 steps (the
    # saves done counted), never past the step count the Trainer sized its epochs for (the first plan's 400).
    nxt = 10 + int(0.1 * total)
    assert timer.next_replan == nxt
    timer.times += [2.0] * (nxt - 10)  # steps 11..nxt
    timer.ends += [timer.ends[-1] + 2.0 * i for i in range(1, nxt - 9)]
    timer.on_save(None, state, None)  # one checkpoint written (by an earlier spacing), three to come
    timer._replan(SimpleNamespace(max_steps=total, save_steps=total // 4, global_step=nxt), scheduler)
    again = timer.replanned
    left = timer.deadline - timer.ends[-1] - 3 * 2.0
    assert again["step_s"] == 2.0 and again["at_step"] == nxt and again["steps_before"] == total
    assert again["steps"] == min(400, nxt + int(0.97 * left / 2.0)) > total and len(timer.replans) == 2
    (rate,) = scheduler.lr_lambdas
    assert rate(again["steps"]) == 0.0
    # 20 steps of 0.2 s: the pace is the recent one (all steps since the first have a median of 2 s), and the plan
    # stops at the bound.
    timer.times += [0.2] * 20
    timer.ends += [timer.ends[-1] + 0.2 * i for i in range(1, 21)]
    timer._replan(SimpleNamespace(max_steps=again["steps"], save_steps=100, global_step=nxt + 20), scheduler)
    assert timer.replanned["step_s"] == pytest.approx(0.2) and timer.replanned["steps"] == 400


def test_plan_steps_leaves_room_for_the_saves():
    pace = ttq.Pace(step_s=1.0, overhead_s=10.0, save_s=2.0)
    start = ttq.time.time()
    plain, saving = ttq.plan_steps(1000.0, start, pace), ttq.plan_steps(1000.0, start, pace, saves=32)
    assert plain == int(ttq.PLAN_MARGIN * 990.0)
    assert saving == int(ttq.PLAN_MARGIN * (990.0 - 64.0))


def test_discriminator_summary_compares_the_loss_with_predicting_the_replaced_share():
    rows = [
        {
            "step": s,
            "wall": 10.0 + s,
            "generator_loss": 6.0,
            "discriminator_loss": (0.2 if s % 2 else 0.4) if s <= 90 else 0.41,  # a mean of 0.3 up to step 90
            "replaced_fraction": 0.15,
            "discriminator_recall": 0.5 if s <= 90 else 0.0,
            "discriminator_precision": 0.7,
        }
        for s in range(1, 101)
    ]
    summary = ttq.discriminator_summary(rows, start=10.0, points=10)
    prior = -(0.15 * np.log(0.15) + 0.85 * np.log(0.85))
    assert [p["step"] for p in summary["curve"]] == list(range(10, 101, 10))
    assert summary["curve"][0]["prior_loss"] == pytest.approx(prior)
    assert [p["loss"] for p in summary["curve"]] == pytest.approx([0.3] * 9 + [0.41])  # window means, not samples
    assert summary["curve"][0]["recall"] == 0.5
    assert summary["curve"][-1]["time_s"] == pytest.approx(100.0)
    tail = summary["last_tenth"]
    assert tail["steps"] == [91, 100]
    assert tail["loss"] == pytest.approx(0.41) and tail["recall"] == 0.0
    assert tail["prior_loss"] == pytest.approx(prior)


def test_count_baselines_score_the_same_masks_by_hand():
    """Ids: 1 [CLS], 2 [SEP], 3 [MASK], 4 'a', 5 'b'. Training text a b a b a a: counts a 4, b 2, no singleton, so
    the unseen mass is one token's (1/6) over the four unseen ids; p(b) = 5/6 * 2/6. The successors of a: b twice, a
    once (2 distinct), so Witten-Bell gives p(b | a) = (2 + 2 p(b)) / (3 + 2). Three masked positions: b after a
    visible 'a'; a after [MASK] and b right after [CLS] (both fall back to the unigram)."""
    masks = ttq.FixedMasks(
        input_ids=np.array([[1, 4, 3, 3, 2], [1, 3, 4, 4, 2]]),
        labels=np.array([[-100, -100, 5, 4, -100], [-100, 5, -100, -100, -100]]),
    )
    result = ttq.count_baselines([np.array([4, 5, 4, 5, 4, 4])], masks, vocab_size=6, mask_id=3)
    p_a, p_b = 5 / 6 * 4 / 6, 5 / 6 * 2 / 6
    p_b_after_a = (2 + 2 * p_b) / 5
    assert result["unigram"] == pytest.approx(-(2 * np.log(p_b) + np.log(p_a)) / 3, rel=1e-6)
    assert result["bigram"] == pytest.approx(-(np.log(p_b_after_a) + np.log(p_a) + np.log(p_b)) / 3, rel=1e-6)


def test_roc_auc_counts_pairs_with_ties_as_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    positive = rng.random(300) < 0.3 + 0.1 * scores / 5
    pos, neg = scores[positive], scores[~positive]
    by_pairs = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert ttq.roc_auc(scores, positive) == pytest.approx(by_pairs, rel=1e-12)
    assert ttq.roc_auc(np.array([0.1, 0.9, 0.4]), np.array([False, True, False])) == 1.0
    assert ttq.roc_auc(np.array([0.1, 0.9, 0.4]), np.array([True, False, False])) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        ttq.roc_auc(np.array([0.1, 0.2]), np.array([True, True]))


def test_each_system_gains_over_the_random_init_of_its_own_architecture():
    """The default rows (DeBERTa) against the random deberta-tiny, the --bert row against a random tiny BERT
    (``FLOORS``): what an untrained architecture already has is not counted as what pretraining gave."""

    def row(accuracy: float, probe: float) -> dict:
        return {"finetuned": {"s": {"test": {"mean": accuracy, "se": 0.01}}}, "linear_probe": {"t": {"test": probe}}}

    results = {
        "fastbert_mlm": row(0.80, 0.75),
        "fastbert_bert": row(0.70, 0.60),
        "random_init": row(0.78, 0.55),
        "random_init_bert": row(0.60, 0.50),
    }
    suite = type("Suite", (), {"settings": {"s": None}})()
    gains = ttq.gains_over_random_init(results, suite)
    assert gains["fastbert_bert"]["finetuned"]["s"]["points"] == pytest.approx(10.0)
    assert gains["fastbert_mlm"]["finetuned"]["s"]["points"] == pytest.approx(2.0)
    assert not gains["fastbert_mlm"]["finetuned"]["s"]["beyond_2se"]
    assert gains["fastbert_mlm"]["linear_probe"]["t"] == pytest.approx(20.0)
    del results["random_init_bert"]  # a report without the BERT floor gives that row no gains
    assert "fastbert_bert" not in ttq.gains_over_random_init(results, suite)


def test_random_deberta_is_the_drivers_initialisation_and_loads_in_transformers(tmp_path):
    out = ttq.random_deberta(tmp_path / "floor", 300)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    assert type(model).__name__ == "DebertaV2ForSequenceClassification"
    again = ttq.random_deberta(tmp_path / "again", 300)
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()  # seeded


def test_a_deberta_checkpoint_fine_tunes_in_fastberts_classifier_with_transformers_logits(tmp_path):
    """The downstream suite fine-tunes a DeBERTa checkpoint in fastbert's classifier, with fine-tuning's dropout:
    saved and read back by transformers, its logits are ``DebertaV2ForSequenceClassification``'s; a checkpoint short
    of an encoder tensor is refused."""
    import downstream
    from safetensors.torch import load_file, save_file

    floor = ttq.random_deberta(tmp_path / "floor", 300)
    config = json.loads((floor / "config.json").read_text())  # as the recipe trains: no dropout
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (floor / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    ours = downstream.load_classifier(floor, 3, 300)
    assert type(ours).__module__ == "fastbert.deberta"
    assert ours.config.hidden_dropout_prob == ours.config.attention_probs_dropout_prob == downstream.FINETUNE_DROPOUT
    ours.save_pretrained(tmp_path / "classifier")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 12, 102, 0, 0]])
    with torch.no_grad():
        a = ours.eval()(input_ids=ids, attention_mask=(ids != 0).long()).logits
        b = theirs(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    state = load_file(floor / "model.safetensors")
    del state[next(k for k in state if ".layer.1." in k)]
    save_file(state, floor / "model.safetensors")
    with pytest.raises(ValueError, match="not a DeBERTa encoder checkpoint"):
        downstream.load_classifier(floor, 3, 300)


def test_a_deberta_electra_export_scores_as_its_discriminator(tmp_path):
    """``load_discriminator`` on a DeBERTa-v3 ELECTRA export (transformers' encoder, the ``mask_predictions`` head
    applied by the benchmark) gives the logits of fastbert's own forward pass on the same corrupted ids."""
    from fastbert.deberta import DebertaConfig
    from fastbert.deberta_electra import DebertaElectraForPreTraining, generator_config

    config = DebertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, position_buckets=8, max_relative_positions=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DebertaElectraForPreTraining(config, generator_config(config)).eval()
    with torch.no_grad():
        model.embedding_delta.normal_(0, 0.05)  # the discriminator's own share of its embeddings, not zero
        model.discriminator_head.classifier.bias.fill_(0.3)
    model.save_pretrained(tmp_path / "electra")
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    keys = torch.arange(int(chosen.sum()), dtype=torch.int64) * 7919 + 5
    with torch.no_grad():
        out = model(ids.masked_fill(chosen, 4), torch.ones_like(ids), labels=ids.where(chosen, -100),
                    replacement_keys=keys)  # fmt: skip
        logits = ttq.load_discriminator(tmp_path / "electra")(out.corrupted_ids)
    torch.testing.assert_close(logits, out.discriminator_logits, atol=1e-5, rtol=1e-5)


def test_quick_run_measures_every_system_and_writes_its_json_and_plot(tmp_path):
    """``--quick``: the whole benchmark (three systems through their command lines, held-out loss, ELECTRA's AUC,
    fine-tuning with the dev-chosen rate, probes, bag of words) at a toy size; figures are not checked, the report's
    shape and its internal agreement are."""
    import json
    import subprocess

    out = tmp_path / "ttq.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_time_to_quality.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert set(r["systems"]) == {"transformers", "fastbert_mlm", "fastbert_electra", "random_init"}
    settings = r["downstream"]["settings"]
    assert {s["kind"] for s in settings.values()} == {"low-label", "word-order"}  # --quick leaves "full" out
    for key in ("fastbert_mlm", "fastbert_electra", "random_init"):
        for name in settings:
            tuned = r["systems"][key]["finetuned"][name]
            assert len(tuned["test"]["runs"]) == r["downstream"]["seeds"] == 2
            assert tuned["dev_by_lr"][f"{tuned['lr']:g}"] == max(tuned["dev_by_lr"].values())  # chosen on dev
            assert all(len(runs) == r["downstream"]["choose_on"] == 2 for runs in tuned["dev_runs_by_lr"].values())
        assert set(r["systems"][key]["linear_probe"]) == {"testament", "word_order", "fortunes"}
    assert "finetuned" not in r["systems"]["transformers"]  # probed only
    mlm = r["gains_over_random_init"]["fastbert_mlm"]["finetuned"]
    for name in settings:
        a, b = r["systems"]["fastbert_mlm"]["finetuned"][name], r["systems"]["random_init"]["finetuned"][name]
        assert mlm[name]["points"] == pytest.approx(100 * (a["test"]["mean"] - b["test"]["mean"]))
    electra = r["systems"]["fastbert_electra"]
    assert 0.0 <= electra["held_out_discriminator"]["roc_auc"] <= 1.0
    # ELECTRA's budget opens with the recipe's MLM phase, which its run then starts from.
    assert electra["first_phase"]["steps"] >= 1 and 0 < electra["first_phase"]["time_s"] < electra["time_s"]
    assert r["flags"]["fastbert_electra_starts_from"]["flags"] == r["flags"]["fastbert_mlm"]
    assert r["flags"]["fastbert_mlm"][:2] == ["--config", "short-budget"]
    assert set(r["goals"]) >= {"final_below_bigram", "low_label_3_points_beyond_2se", "linear_probe_5_points"}
    assert "goal final_below_bigram:" in result.stdout
