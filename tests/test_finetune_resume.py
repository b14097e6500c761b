"""finetune --resume (issue 15): a run stopped at an epoch's end or in the middle of one, by SIGTERM, resumes from
OUT/state with the same metrics.jsonl rows, eval_results.json, predictions and bitwise the same final weights as a
run that was never stopped, in one process and on 2 ranks under torchrun; what cannot be resumed is refused with a
clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import torchrun
from safetensors.torch import load_file

from fastbert import BertConfig, BertForPreTraining
from fastbert.tokenizer import WordPieceTokenizer
from fastbert.train import checkpoint
from fastbert.train.finetune import FinetuneArgs, FinetuneInterrupted, ResumeError, RunExistsError, finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the fine-tuning task
from comment_or_docstring import stdlib_comment_or_docstring  # noqa: E402

TIMING = ("train_seconds", "train_examples_per_s")  # the only fields of a metrics row that may differ
FREE = ("resume", "overwrite", "progress")  # arguments a resumed run may give otherwise


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    """A random-init 2-layer BERT with the real bert-base-uncased vocabulary (dropout 0.1, so that the RNG
    matters), and a learnable regression on real text: a line's length in words (capped at 20) / 20. 96 training
    rows in batches of 8 are 12 steps per epoch; the evaluation's Pearson r is higher after epoch 2 than after 1,
    so the best model is the final one."""
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    BertForPreTraining(
        BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    ).save_pretrained(root / "model")
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(root / "model")
    rows = stdlib_comment_or_docstring(640, seed=1)

    def table(name, part, labelled=True):
        lines = [{"text": t, **({"label": min(len(t.split()), 20) / 20} if labelled else {})} for t, _ in part]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
        return root / name

    return {
        "model": root / "model",
        "train": table("train.jsonl", rows[:96]),
        "eval": table("eval.jsonl", rows[600:640]),
        "predict": table("predict.jsonl", rows[560:580], labelled=False),
        "root": root,
    }


def run_args(files, out: Path, **changes) -> FinetuneArgs:
    args = dict(
        task="regress",
        model=str(files["model"]),
        train=str(files["train"]),
        eval=str(files["eval"]),
        predict=str(files["predict"]),
        out=str(out),
        epochs=2,
        lr=1e-3,
        batch_size=8,
        max_length=64,
        progress=False,
    )
    return FinetuneArgs(**{**args, **changes})


def cli_flags(args: FinetuneArgs) -> list[str]:
    flags = []
    for key in ("task", "model", "train", "eval", "predict", "out", "epochs", "lr", "batch_size", "max_length"):
        flags += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return [*flags, "--no-progress"]


@pytest.fixture(scope="module")
def straight(files) -> Path:
    """The 2-epoch run, never stopped; --resume auto on an --out with no state starts it afresh."""
    out = files["root"] / "straight"
    finetune(run_args(files, out, resume="auto"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["eval_pearson"] > rows[0]["eval_pearson"]
    assert json.loads((out / "eval_results.json").read_text())["epoch"] == 2  # best/ holds the final weights
    assert not (out / "state").exists()  # a finished run keeps no state
    return out


def kill_self_at(step: int, times: int = 1):
    def hook(done: int) -> None:
        if done == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)

    return hook


def assert_same_run(expected: Path, got: Path, bitwise: bool = True) -> None:
    """The same metrics rows (timing aside), eval_results.json (timing and the resume flags aside), predictions and
    final weights; bitwise unless ``bitwise`` is False (then to 1e-6)."""

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]

    def results(run):
        r = json.loads((run / "eval_results.json").read_text())
        r["args"] = {k: v for k, v in r["args"].items() if k not in (*FREE, "out")}
        return {k: v for k, v in r.items() if k not in TIMING}

    if bitwise:
        assert rows(got) == rows(expected)
        assert results(got) == results(expected)
        if (expected / "predictions.jsonl").exists():
            assert (got / "predictions.jsonl").read_text() == (expected / "predictions.jsonl").read_text()
    else:
        for a, b in zip(rows(expected), rows(got), strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-6), k
    w1, w2 = (load_file(run / "best" / "model.safetensors") for run in (expected, got))
    assert w1.keys() == w2.keys()
    assert all(v.dtype == torch.float32 for v in w2.values())
    if bitwise:
        differ = [k for k in w1 if not torch.equal(w1[k], w2[k])]
        assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    else:
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-6
    assert not (got / "state").exists() and not (got / ".state-old").exists() and not (got / ".state-new").exists()


def test_resume_after_an_epoch_is_exact(files, straight, tmp_path):
    """SIGTERM after epoch 1 (from the on_epoch hook): the run stops before epoch 2's first step with its state in
    OUT/state; --resume auto finishes it exactly as the straight run; a finished run is not resumed again."""
    out = tmp_path / "out"
    stop_after_first = lambda record: record["epoch"] == 1 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    with pytest.raises(FinetuneInterrupted, match=r"SIGTERM: state saved in .*state at step 12 of 24") as stop:
        finetune(run_args(files, out), on_epoch=stop_after_first)
    assert stop.value.result == {"stopped": "SIGTERM", "epoch": 2, "step": 12, "steps": 24, "state": str(out / "state")}
    assert isinstance(stop.value, KeyboardInterrupt)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and not (out / "eval_results.json").exists()
    state = out / "state"
    assert {p.name for p in state.iterdir()} == {
        "MANIFEST.json",
        "model_optimizer.pt",
        "rank0.pt",
        "trainer_state.json",
    }
    trainer = json.loads((state / "trainer_state.json").read_text())
    assert (trainer["epoch"], trainer["batch"], trainer["step"]) == (1, 0, 12)
    assert trainer["best_metrics"]["epoch"] == 1 and trainer["best"] == trainer["best_metrics"]["eval_pearson"]
    assert trainer["args"]["epochs"] == 2 and trainer["label_names"] is None and len(trainer["records"]) == 1
    saved = torch.load(state / "model_optimizer.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in saved["model"].values())
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(saved["optimizer"]["state"].values())))
    assert {"python", "numpy", "torch"} <= set(torch.load(state / "rank0.pt", weights_only=True)["rng"])
    # Without --resume the interrupted run is a run like any other: refused.
    with pytest.raises(RunExistsError, match=r"already holds a fine-tuning run \(metrics\.jsonl, best, state\)"):
        finetune(run_args(files, out))

    finetune(run_args(files, out, resume="auto"))
    assert_same_run(straight, out)
    with pytest.raises(RunExistsError, match=r"--resume auto: --out .* holds a finished fine-tuning run .*--overwrite"):
        finetune(run_args(files, out, resume="auto"))


def test_resume_in_the_middle_of_epochs_is_exact(files, straight, tmp_path):
    """Stopped after step 5 (epoch 1), resumed and stopped again after step 17 (epoch 2), resumed to the end: the
    epoch's loss sum, the data position, the RNG and the optimizer carry over each time."""
    out = tmp_path / "out"
    with pytest.raises(FinetuneInterrupted, match="at step 5 of 24 \\(epoch 1 of 2\\)"):
        finetune(run_args(files, out), on_step=kill_self_at(5))
    trainer = json.loads((out / "state" / "trainer_state.json").read_text())
    assert (trainer["epoch"], trainer["batch"], trainer["step"], trainer["records"]) == (0, 5, 5, [])
    assert (out / "metrics.jsonl").read_text() == ""
    with pytest.raises(FinetuneInterrupted, match="at step 17 of 24 \\(epoch 2 of 2\\)"):
        finetune(run_args(files, out, resume=str(out)), on_step=kill_self_at(17))
    trainer = json.loads((out / "state" / "trainer_state.json").read_text())
    assert (trainer["epoch"], trainer["batch"], trainer["step"], len(trainer["records"])) == (1, 5, 17, 1)
    finetune(run_args(files, out, resume=str(out / "state")))
    assert_same_run(straight, out)


def test_what_cannot_be_resumed_is_refused(files, tmp_path):
    out = tmp_path / "out"
    train = tmp_path / "train.jsonl"  # this test's own copy, changed below
    train.write_text(files["train"].read_text())
    with pytest.raises(ResumeError, match=r"--resume .*out: no state to resume from in .*out \(no .*state\)"):
        finetune(run_args(files, out, train=str(train), resume=str(out)))
    assert not out.exists()
    # A second signal stops at once, without saving: a new --out is left as it was (absent).
    with pytest.raises(KeyboardInterrupt, match="SIGTERM again: stopped without saving") as e:
        finetune(run_args(files, out, train=str(train)), on_step=kill_self_at(2, times=2))
    assert not isinstance(e.value, FinetuneInterrupted) and not out.exists()

    with pytest.raises(FinetuneInterrupted):
        finetune(run_args(files, out, train=str(train)), on_step=kill_self_at(1))
    with pytest.raises(ResumeError, match=r"saved by a run with other arguments \(epochs: saved 2, now 3; lr: .*\)"):
        finetune(run_args(files, out, train=str(train), resume="auto", epochs=3, lr=2e-3))
    with pytest.raises(ResumeError, match="a fine-tuning run resumes in its own --out"):
        finetune(run_args(files, out, train=str(train), resume=str(tmp_path)))
    with open(train, "a") as f:  # the same path, other contents
        f.write(json.dumps({"text": "one more line", "label": 0.15}) + "\n")
    with pytest.raises(ResumeError, match="--train changed since the state was saved"):
        finetune(run_args(files, out, train=str(train), resume="auto"))
    train.write_text(files["train"].read_text())
    state = out / "state"
    data = bytearray((state / "model_optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (state / "model_optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"model_optimizer\.pt: sha256 differs"):
        finetune(run_args(files, out, train=str(train), resume="auto"))
    # --overwrite (without --resume) starts over: the state goes with the rest of the run.
    finetune(run_args(files, out, train=str(train), overwrite=True, epochs=1, predict=None))
    assert sorted(p.name for p in out.iterdir()) == ["best", "eval_results.json", "metrics.jsonl"]


WORKER = '''
"""`fastbert` (cli.main) with test hooks in finetune: STOP_RANK's process sends itself SIGTERM after step STOP_AT;
with WAIT_AFTER_EPOCH the run waits at the end of that epoch until a signal has come from outside."""
import os, signal, sys, time

import fastbert.train.finetune as ft
from fastbert import cli

real = ft.finetune


def finetune(args, on_epoch=None, on_step=None):
    rank = int(os.environ.get("RANK", "0"))

    def step_hook(step):
        if step == int(os.environ.get("STOP_AT", "0")) and rank == int(os.environ.get("STOP_RANK", "0")):
            os.kill(os.getpid(), signal.SIGTERM)

    def epoch_hook(record):
        if record["epoch"] == int(os.environ.get("WAIT_AFTER_EPOCH", "0")):
            request = signal.getsignal(signal.SIGTERM).__self__  # finetune's stop request
            deadline = time.time() + 120
            while not request.requested and time.time() < deadline:
                time.sleep(0.01)

    return real(args, on_epoch=epoch_hook, on_step=step_hook)


ft.finetune = finetune
sys.exit(cli.main(sys.argv[1:]))
'''


def test_cli_sigterm_exits_130_and_resume_auto_finishes_the_run(files, straight, tmp_path):
    """`fastbert finetune` gets SIGTERM from outside once metrics.jsonl has its first row (the run waits there for
    it, so the signal cannot come too late): it saves, says how to continue and exits 130; `--resume auto` then
    finishes the run exactly as the straight run."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    flags = cli_flags(run_args(files, out))
    env = {**os.environ, "WAIT_AFTER_EPOCH": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(worker), "finetune", *flags], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=240)[1]
    assert proc.returncode == 130, stderr[-3000:]
    assert "fastbert finetune: SIGTERM: saving the run's state when this step ends" in stderr
    assert (
        f"fastbert finetune: interrupted (SIGTERM: state saved in {out / 'state'} at step 12 of 24 (epoch 2 of 2); "
        f"continue with: fastbert finetune --resume auto --out {out} (and the same options))" in stderr
    )
    resumed = subprocess.run(
        [sys.executable, "-m", "fastbert", "finetune", *flags, "--resume", "auto"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight, out)


def test_two_ranks_resume_after_a_signal_on_one_rank(files, tmp_path):
    """torchrun, 2 ranks, ZeRO-2: rank 1 alone gets SIGTERM after step 5; both ranks stop at that step boundary
    (they agree through the step's exchange), save DeepSpeed's checkpoint of the partitioned optimizer state in
    OUT/state and exit 130; `--resume auto` on 2 ranks ends with the straight 2-rank run's metrics and weights."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("straight", "stopped"):
        flags = [*cli_flags(run_args(files, tmp_path / name)), "--zero-stage", "2"]
        target = ("-m", "fastbert") if name == "straight" else (str(worker),)
        extra = {} if name == "straight" else {"STOP_AT": "5", "STOP_RANK": "1"}
        runs[name] = (
            flags,
            subprocess.run(
                [*torchrun(2, *target), "finetune", *flags],
                capture_output=True,
                text=True,
                env={**env, **extra},
                timeout=600,
            ),
        )
    assert runs["straight"][1].returncode == 0, runs["straight"][1].stderr[-3000:]
    stopped = runs["stopped"][1]
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert "interrupted (a signal on another rank: state saved" in stopped.stderr, stopped.stderr[-3000:]
    assert "interrupted (SIGTERM: state saved" in stopped.stderr
    state = tmp_path / "stopped" / "state"
    trainer = json.loads((state / "trainer_state.json").read_text())
    assert (trainer["epoch"], trainer["batch"], trainer["step"], trainer["world_size"]) == (0, 5, 5, 2)
    names = {p.name for p in state.iterdir()}
    assert {"rank0.pt", "rank1.pt", "mp_rank_00_model_states.pt"} <= names
    assert sum("optim_states" in n for n in names) == 2  # each rank's ZeRO partition
    assert not (tmp_path / "stopped" / "zero_to_fp32.py").exists()  # DeepSpeed's scripts stay out of --out

    resumed = subprocess.run(
        [*torchrun(2), "finetune", *runs["stopped"][0], "--resume", "auto"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
