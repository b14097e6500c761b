"""The pretraining driver end to end on CPU/gloo: exact resume after SIGKILL, launchers agreeing, export loaded by
transformers, and bad setups refused before the first step."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ports import free_port, torchrun

from fastbert.data.corpus import stdlib_documents
from fastbert.data.prepare import PrepareOptions, prepare

MODEL = {
    "vocab_size": 1500,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
WORKERS = Path(__file__).parent / "workers"
# What metrics.jsonl records that is not a function of the run's inputs: timings.
TIMINGS = {"tokens_per_s", "samples_per_s", "mfu", "time", "wall", "max_memory_gb"}  # and clocks


def start(cmd) -> subprocess.Popen:
    """A launcher in a process group of its own, so that a test can signal or kill it with all its children."""
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(pid: int) -> list[int]:
    table, found, frontier = _processes(), [], [pid]
    while frontier:
        children = [c for c, (parent, _, _) in table.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """``sig`` to the launcher's process group and to every process below it: torchrun starts each rank in a session
    of its own, so the launcher's group alone does not reach the ranks (nor their loader workers)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        for send in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                send(pid, sig)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The launcher's output once it exits; past ``timeout`` its whole group is killed and the test fails."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_group(proc)
        output = proc.communicate()[0]
        pytest.fail(f"{proc.args[:6]}... still running after {timeout} s:\n{output[-3000:]}")


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """Poll ``ready()`` while ``proc`` runs; kill its group and fail if it ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            output = proc.communicate()[0]
            state = "ended" if proc.returncode is not None and time.monotonic() <= deadline else "timed out"
            pytest.fail(f"the run {state} before the test could act (rc {proc.returncode}):\n{output[-3000:]}")
        time.sleep(0.02)


def steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def tensor_differences(a, b, path: str = "") -> list[str]:
    """Every place where two loaded checkpoint files differ in a tensor (bitwise, dtype and shape included) or in
    their structure; other leaves (ints, strings, DeepSpeed's plain objects) are not compared."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return [f"{path}: tensor vs {type(b if torch.is_tensor(a) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return [f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))} in one only"]
        return [d for k in a for d in tensor_differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=False)) for d in tensor_differences(x, y, f"{path}[{i}]")]
    return []


def checkpoint_differences(a: Path, b: Path) -> list[str]:
    """Bitwise differences between two checkpoints' DeepSpeed files: the model states (module weights, and the
    optimizer state without ZeRO) and every rank's ZeRO optimizer partition (fp32 master weights, LAMB's moments).
    RNG files are left out (they hold numpy's unseeded global state, which nothing in training draws from)."""
    from fastbert.train.checkpoint import load_weights_only

    names = sorted(p.name for p in a.glob("*.pt") if not p.name.startswith("rng-"))
    assert any(n.endswith("model_states.pt") for n in names), names
    assert names == sorted(p.name for p in b.glob("*.pt") if not p.name.startswith("rng-")), (a, b)
    return [d for n in names for d in tensor_differences(load_weights_only(a / n), load_weights_only(b / n), n)]


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMINGS}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A real corpus, a vocabulary trained on it with the tokenizers library, prepared shards, a small config."""
    from tokenizers import BertWordPieceTokenizer

    root = tmp_path_factory.mktemp("pretrain")
    docs = [" ".join(p) for p in stdlib_documents(limit_bytes=150_000)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train([str(root / "corpus.txt")], vocab_size=MODEL["vocab_size"], show_progress=False)
    trainer.save_model(str(root))
    vocab_size = len((root / "vocab.txt").read_text().splitlines())
    prepare(
        [str(root / "corpus.txt")],
        root / "data",
        PrepareOptions(vocab=str(root / "vocab.txt"), seq_len=64),
        progress=False,
    )
    prepare(
        [str(root / "corpus.txt")],
        root / "data128",
        PrepareOptions(vocab=str(root / "vocab.txt"), seq_len=128, objective="nsp"),
        progress=False,
    )
    (root / "model.json").write_text(json.dumps({**MODEL, "vocab_size": vocab_size}))
    return {"root": root, "data": root / "data", "data128": root / "data128", "model": root / "model.json"}


def pretrain_cmd(setup, out: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m", "fastbert")):
    return [
        *launcher,
        "pretrain",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["data"]),
        "--out",
        str(out),
        "--global-batch",
        "8",
        "--micro-batch",
        "2",
        "--steps",
        "8",
        "--lr",
        "5e-3",
        "--warmup",
        "2",
        "--no-progress",
        *extra,
    ]


def node_launchers(tmp_path: Path, command, *target: str) -> list[subprocess.Popen]:
    """Two one-rank nodes on this machine, each under its own ``deepspeed --no_ssh --node_rank`` launcher (as on two
    hosts) in its own process group; ``command(launcher)`` makes the command line, ``target`` is what the launcher
    runs (default ``--module fastbert``)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(free_port())
    return [
        start(
            command(
                (
                    "deepspeed",
                    "--hostfile",
                    str(hostfile),
                    "--no_ssh",
                    "--node_rank",
                    str(r),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    port,
                    *(target or ("--module", "fastbert")),
                )
            )
        )
        for r in range(2)
    ]


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, capture_output=True, text=True, env={**ENV, **kw.pop("env", {})}, timeout=timeout, **kw
    )
    return result


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(setup) -> Path:
    out = setup["root"] / "reference"
    result = run(pretrain_cmd(setup, out, "--dropout", "0.1", "--save-every", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigkill_and_resume_reproduce_the_run_bitwise(setup, reference_run, tmp_path):
    """One process, no ZeRO, two loader workers (the reference run has none): killed with SIGKILL after a checkpoint
    landed and resumed, the final checkpoint and every logged metric are bitwise those of the straight run."""
    out = tmp_path / "killed"
    args = ("--dropout", "0.1", "--save-every", "2", "--loader-workers", "2")
    proc = start(pretrain_cmd(setup, out, *args))
    wait_until(proc, lambda: steps_logged(out) >= 3)  # kill after step 3, around step 4's checkpoint
    kill_group(proc)
    proc.communicate(timeout=60)
    # A half-written newer checkpoint must not be picked up.
    partial = out / "checkpoints" / "step-00000099"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in {"step-00000002", "step-00000004", "step-00000006"}  # complete, and short of the last step
    result = run(pretrain_cmd(setup, out, *args, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in result.stderr
    assert metrics(out) == metrics(reference_run)
    final = "checkpoints/step-00000008"
    assert checkpoint_differences(reference_run / final, out / final) == []


ZERO2_RUN = ("--dropout", "0.1", "--zero-stage", "2", "--loader-workers", "2", "--save-every", "2", "--steps", "6")


@pytest.fixture(scope="module")
def zero2_reference(setup) -> Path:
    out = setup["root"] / "zero2-reference"
    result = run(pretrain_cmd(setup, out, *ZERO2_RUN, launcher=torchrun(2)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_torchrun_zero2_interrupted_and_resumed_is_bitwise_the_straight_run(setup, zero2_reference, tmp_path, sig):
    """2 ranks under torchrun, ZeRO-2, two loader workers a rank, dropout 0.1. SIGTERM to torchrun's process group
    (torchrun sends it on to each rank's process group, the loader workers included) makes every rank save at the
    step it stops at; SIGKILL (to every process of the run) loses the steps after the last checkpoint. Either way,
    resumed with --resume auto, the final checkpoint (weights, both ranks' optimizer partitions) and the metrics are
    bitwise the straight run's."""
    out = tmp_path / "interrupted"
    latest = out / "checkpoints" / "latest"
    proc = start(pretrain_cmd(setup, out, *ZERO2_RUN, launcher=torchrun(2)))
    wait_until(proc, (lambda: steps_logged(out) >= 2) if sig == signal.SIGTERM else latest.exists)
    if sig == signal.SIGTERM:
        os.killpg(proc.pid, sig)  # torchrun passes it on to each rank's process group
    else:
        kill_group(proc)  # the launcher, the ranks and their loader workers at once
    output = finish(proc, timeout=120)
    tag = latest.read_text()
    step = int(tag.removeprefix("step-"))
    assert step < 6, f"the run got to {tag} before the signal"
    if sig == signal.SIGTERM:
        assert output.count("fastbert pretrain: SIGTERM: saving a checkpoint when this step ends") == 1, output[-3000:]
        assert output.count("interrupted by SIGTERM before step 6, checkpoint saved") == 1, output[-3000:]  # rank 0
        assert proc.returncode != 0  # an interrupted run is not a finished one
        assert "DataLoader worker" not in output, output[-3000:]
        assert steps_logged(out) == step
    result = run(pretrain_cmd(setup, out, *ZERO2_RUN, "--resume", "auto", launcher=torchrun(2)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / tag} at step {step}" in result.stderr
    assert metrics(out) == metrics(zero2_reference)
    final = "checkpoints/step-00000006"
    assert len(list((out / final).glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert checkpoint_differences(zero2_reference / final, out / final) == []


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(setup, tmp_path, zero):
    """Rank 1's losses are NaN on every micro-batch of step 3 (tests/workers/pretrain_fault.py): both ranks skip it
    (checkpoints 2 and 3 bitwise equal, weights and optimizer state), it is logged as skipped and no other step is,
    the learning rate schedule goes on by step number, and the steps after it train with finite losses."""
    from fastbert.optim import warmup_poly_lr

    k, steps, out = 3, 5, tmp_path / "nan"
    cmd = pretrain_cmd(
        setup,
        out,
        "--zero-stage",
        str(zero),
        "--steps",
        str(steps),
        "--save-every",
        "1",
        "--keep",
        "0",
        "--dropout",
        "0.1",
        launcher=torchrun(2, str(WORKERS / "pretrain_fault.py"), "nan", "1", str(k)),
    )
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {k} skipped" in result.stderr
    logged = metrics(out)
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    assert [m["skipped"] for m in logged] == [s == k for s in range(1, steps + 1)]
    assert math.isnan(logged[k - 1]["loss"]) and logged[k - 1]["grad_norm"] is None  # the NaN did reach step k
    for m in logged[: k - 1] + logged[k:]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), m
    assert [m["lr"] for m in logged] == [warmup_poly_lr(s - 1, 5e-3, 2, steps, 1.0) for s in range(1, steps + 1)]
    ckpt = [None] + [out / "checkpoints" / f"step-{s:08d}" for s in range(1, steps + 1)]
    assert checkpoint_differences(ckpt[k - 1], ckpt[k]) == []
    assert checkpoint_differences(ckpt[k - 2], ckpt[k - 1]) != []  # the steps around it do update
    assert checkpoint_differences(ckpt[k], ckpt[k + 1]) != []


def _stopped(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is stopped (state T)."""
    return any(group == pgid and state == "T" for _, group, state in _processes().values())


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_node_fails_the_other_within_dist_timeout(setup, tmp_path, fault):
    """Two nodes, each under its own deepspeed launcher, --dist-timeout 10, ZeRO-2. "killed": node 1's whole process
    group is SIGKILLed after the first step. "hung": node 1's rank stops itself (SIGSTOP, sockets left open) in the
    middle of step 2, so node 0's rank is waiting inside one of DeepSpeed's own collectives (its data-parallel group,
    not the world group) and only the timeout can end the wait. Either way node 0 exits non-zero with an error well
    before the default 120 s timeout, let alone gloo's 30 min default for DeepSpeed's groups."""
    out = tmp_path / "nodes"
    target = ("--module", "fastbert") if fault == "killed" else (str(WORKERS / "pretrain_fault.py"), "stop", "1", "2")
    procs = node_launchers(
        tmp_path,
        lambda launcher: pretrain_cmd(
            setup, out, "--steps", "50", "--zero-stage", "2", "--dist-timeout", "10", launcher=launcher
        ),
        *target,
    )
    try:
        if fault == "killed":
            wait_until(procs[0], lambda: steps_logged(out) >= 1)
            os.killpg(procs[1].pid, signal.SIGKILL)
        else:
            wait_until(procs[0], lambda: _stopped(procs[1].pid))
        start_time = time.monotonic()
        output = finish(procs[0], timeout=110)
        elapsed = time.monotonic() - start_time
    finally:
        for proc in procs:
            kill_group(proc)
            if not proc.stdout.closed:
                proc.communicate()
    assert procs[0].returncode != 0, output[-3000:]
    assert "fastbert pretrain: error:" in output, output[-3000:]
    if fault == "hung":
        assert "10000ms" in output, output[-3000:]  # gloo names the timeout it waited: --dist-timeout's
    assert elapsed < 60, f"node 0 took {elapsed:.0f} s to fail"
    assert steps_logged(out) < 50


def test_export_is_loaded_by_transformers_with_the_same_losses(setup, reference_run, tmp_path):
    import transformers

    from fastbert import BertForPreTraining
    from fastbert.data.masking import MaskingCollator
    from fastbert.data.shards import ShardDataset

    result = run([sys.executable, "-m", "fastbert", "export", str(reference_run), "--out", str(tmp_path / "hf")])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).exists()
    ours = BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    data = ShardDataset(setup["data"])
    ids = data.special_ids
    collate = MaskingCollator(ours.config.vocab_size, list(ids.values()), ids["mask"], padded=True)
    batch = collate([data[i] for i in range(6)], list(range(6)), [0] * 6)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")}
    with torch.no_grad():
        a, b = ours(**inputs).loss.item(), hf(**inputs).loss.item()
    assert abs(a - b) <= 1e-5
    trained = torch.load(next((reference_run / "checkpoints" / "step-00000008").glob("mp_rank_*")), weights_only=False)[
        "module"
    ]
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in trained.items())


def test_deepspeed_launchers_agree_with_one_process(setup, reference_run, tmp_path):
    """DeepSpeed's own launcher on one node (2 ranks, ZeRO-1) and on two "nodes" (one rank each, ZeRO-0) give the
    losses and pre-clipping gradient norms of one process. torchrun with ZeRO-2 is held to one process by
    test_exactness (at the full vocabulary) and to itself across interruptions by the ZeRO-2 resume tests."""
    ref = losses(reference_run)
    dropout0 = ("--dropout", "0")
    single = tmp_path / "single"
    assert run(pretrain_cmd(setup, single, *dropout0)).returncode == 0
    expected = losses(single)
    assert abs(expected[0] - ref[0]) < 0.5  # same data, same init; dropout differs
    ds = tmp_path / "deepspeed"
    result = run(
        pretrain_cmd(
            setup,
            ds,
            *dropout0,
            "--zero-stage",
            "1",
            launcher=(
                "deepspeed",
                "--num_accelerators",
                "2",
                "--master_port",
                str(free_port()),
                "--module",
                "fastbert",
            ),
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    nodes = tmp_path / "nodes"
    procs = node_launchers(tmp_path, lambda launcher: pretrain_cmd(setup, nodes, *dropout0, launcher=launcher))
    outputs = [finish(p, timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    for other in (ds, nodes):
        got = losses(other)
        assert max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True)) <= 1e-5, (other.name, got)
    # The gradient norm before clipping: LAMB's own without ZeRO, DeepSpeed's ZeRO optimizer's with it.
    norms = {
        r.name: [json.loads(line)["grad_norm"] for line in (r / "metrics.jsonl").open()] for r in (single, ds, nodes)
    }
    assert all(n is not None and math.isfinite(n) and n > 0 for ns in norms.values() for n in ns), norms
    assert max(norms["single"]) > 1.0  # clipping (at 1.0) was active, so the norms are taken before it
    for name in ("deepspeed", "nodes"):
        assert max(abs(a - b) / b for a, b in zip(norms[name], norms["single"], strict=True)) <= 1e-4, norms


def test_bad_setups_fail_before_training(setup, reference_run, tmp_path):
    result = run(pretrain_cmd(setup, tmp_path / "a", "--global-batch", "10", "--micro-batch", "4"))
    assert result.returncode == 1
    assert "--global-batch 10 is not divisible by --micro-batch 4 x world size 1 = 4" in result.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists()

    other = json.loads(setup["model"].read_text()) | {"intermediate_size": 256}
    (tmp_path / "other.json").write_text(json.dumps(other))
    cmd = pretrain_cmd(setup, reference_run, "--resume", "auto")
    cmd[cmd.index("--model") + 1] = str(tmp_path / "other.json")
    result = run(cmd)
    assert result.returncode == 1 and "intermediate_size: checkpoint 128 vs run 256" in result.stderr

    foreign = tmp_path / "foreign"
    import shutil

    shutil.copytree(setup["data"], foreign)
    vocab = (foreign / "vocab.txt").read_text().splitlines()
    (foreign / "vocab.txt").write_text("\n".join(vocab[:-1] + ["zzzz-not-a-token"]) + "\n")
    cmd = pretrain_cmd(setup, tmp_path / "b")
    cmd[cmd.index("--data") + 1] = str(foreign)
    result = run(cmd)
    assert result.returncode == 1 and "vocabulary sha256" in result.stderr

    result = run(pretrain_cmd(setup, tmp_path / "c", "--zero-stage", "3"))
    assert result.returncode == 1 and "ZeRO-3 is not supported with LAMB" in result.stderr


def test_a_dead_rank_does_not_hang_the_others(setup, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys\n"
        "import fastbert.train.pretrain as p\n"
        "real = p.checkpoint.save\n"
        "def save(*a, **k):\n"
        "    if int(os.environ['RANK']) == 1:\n"
        "        os._exit(3)\n"
        "    return real(*a, **k)\n"
        "p.checkpoint.save = save\n"
        "from fastbert.cli import main\n"
        "sys.exit(main())\n"
    )
    cmd = pretrain_cmd(
        setup,
        tmp_path / "dead",
        "--save-every",
        "2",
        launcher=torchrun(2, str(script)),
    )
    start = time.time()
    result = run(cmd, timeout=300)
    assert result.returncode != 0
    assert time.time() - start < 240


def test_plot_writes_a_png(reference_run):
    result = run([sys.executable, "-m", "fastbert", "plot", str(reference_run)])
    assert result.returncode == 0, result.stderr
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_saves_a_checkpoint_and_stops(setup, tmp_path, sig):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) to the run's whole process group, loader workers included: the run
    saves a checkpoint at the step it stopped at, says so and how to resume, and exits 130 (so that
    `pretrain && export` does not carry on as if the run had finished)."""
    out = tmp_path / "term"
    cmd = pretrain_cmd(setup, out, "--loader-workers", "2")
    cmd[cmd.index("--steps") + 1] = "500"
    proc = start(cmd)
    wait_until(proc, lambda: steps_logged(out) >= 2)
    os.killpg(proc.pid, sig)
    output = finish(proc, timeout=120)
    assert proc.returncode == 130, output[-3000:]
    done = steps_logged(out)
    assert done < 500
    name = signal.Signals(sig).name
    assert f"{name}: saving a checkpoint when this step ends" in output
    assert (
        f"interrupted by {name} before step 500, checkpoint saved; continue with: fastbert pretrain --resume auto"
        in output
    )
    assert (out / "checkpoints" / "latest").read_text() == f"step-{done:08d}"


def test_a_second_signal_stops_at_once_without_saving(setup, tmp_path):
    out = tmp_path / "twice"
    cmd = pretrain_cmd(setup, out)
    cmd[cmd.index("--steps") + 1] = "500"
    # Steps of 32 micro-batches: the first signal's save comes at the end of the step after the one it lands in, a
    # whole step (tenths of a second) after it, so the second signal, 50 ms later, always lands before the save (with
    # 4 micro-batches a step, a loaded machine once finished that save first).
    cmd[cmd.index("--global-batch") + 1] = "64"
    proc = start(cmd)
    wait_until(proc, lambda: steps_logged(out) >= 2)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    output = finish(proc, timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "SIGINT again: stopped without saving" in output
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*"))


def test_an_out_holding_a_run_is_refused_unless_overwrite(setup, tmp_path):
    out = tmp_path / "taken"
    assert run(pretrain_cmd(setup, out, "--steps", "2")).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    again = run(pretrain_cmd(setup, out, "--steps", "3"))
    assert again.returncode == 1
    assert f"--out {out} already holds a run (1 checkpoint(s), the last step-00000002)" in again.stderr
    assert "--resume auto" in again.stderr and "--overwrite" in again.stderr
    assert (out / "metrics.jsonl").read_text() == before
    fresh = run(pretrain_cmd(setup, out, "--steps", "3", "--save-every", "3", "--overwrite"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_max_minutes_stops_with_a_checkpoint_and_the_clock_goes_on_after_resume(setup, tmp_path):
    out = tmp_path / "budget"
    first = run(pretrain_cmd(setup, out, "--steps", "500", "--max-minutes", "0.0001"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at the --max-minutes 0.0001 budget, checkpoint saved" in first.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step-00000001"
    resumed = run(pretrain_cmd(setup, out, "--steps", "3", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    times, walls = [m["time"] for m in rows], [m["wall"] for m in rows]
    assert 0 < times[0] < times[1] < times[2] and walls == sorted(walls)
    assert walls[1] - walls[0] >= times[1] - times[0] - 1e-6  # the resume's start-up is in the wall clock


def test_a_checkpoint_with_flipped_bytes_is_refused_on_resume_and_export(setup, tmp_path):
    out = tmp_path / "flipped"
    assert run(pretrain_cmd(setup, out, "--steps", "2")).returncode == 0
    states = out / "checkpoints" / "step-00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    states.write_bytes(bytes(data))
    resumed = run(pretrain_cmd(setup, out, "--steps", "4", "--resume", "auto"))
    assert resumed.returncode == 1
    assert f"{states}: sha256 differs from MANIFEST.json" in resumed.stderr, resumed.stderr[-3000:]
    exported = run([sys.executable, "-m", "fastbert", "export", str(out), "--out", str(tmp_path / "hf")])
    assert exported.returncode == 1 and f"{states}: sha256 differs" in exported.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(("warmup", "steps", "expected"), [(0.25, 8, 2), (2, 8, 2), (0, 8, 0), (0.01, 1000, 10)])
def test_warmup_takes_steps_or_a_fraction(warmup, steps, expected):
    from fastbert.train.pretrain import warmup_steps

    assert warmup_steps(warmup, steps) == expected


def test_a_fractional_warmup_above_one_is_an_error():
    from fastbert.train.pretrain import TrainingSetupError, warmup_steps

    with pytest.raises(TrainingSetupError, match="--warmup 2.5: a whole number of steps, or a fraction below 1"):
        warmup_steps(2.5, 8)


def test_phase_two_starts_from_phase_one_weights(setup, reference_run, tmp_path):
    from safetensors.torch import load_file

    cmd = pretrain_cmd(
        setup, tmp_path / "phase2", "--init-from", str(reference_run), "--reset-optimizer", "--lr", "0", "--steps", "1"
    )
    cmd[cmd.index("--data") + 1] = str(setup["data128"])
    cmd[cmd.index("--steps") + 1] = "1"
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    for src, dst in ((reference_run, tmp_path / "hf1"), (tmp_path / "phase2", tmp_path / "hf2")):
        assert run([sys.executable, "-m", "fastbert", "export", str(src), "--out", str(dst)]).returncode == 0
    a = load_file(str(tmp_path / "hf1" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_with_zero2_trains_and_exports_fp32_master_weights(setup, tmp_path):
    from safetensors.torch import load_file

    cmd = pretrain_cmd(setup, tmp_path / "bf16", "--precision", "bf16", "--zero-stage", "2")
    cmd[cmd.index("--steps") + 1] = "2"
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(json.loads(line)["loss"]) for line in (tmp_path / "bf16" / "metrics.jsonl").open())
    result = run([sys.executable, "-m", "fastbert", "export", str(tmp_path / "bf16"), "--out", str(tmp_path / "hf")])
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    # master weights, not bf16 copies: some values are not representable in bf16
    w = weights["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(w, w.to(torch.bfloat16).float())


def test_steps_skipped_in_a_row_stop_the_run_with_an_error(setup, tmp_path):
    """NaN from step 3 on: the run stops after --max-skipped-steps such steps with a non-zero exit and an error,
    and saves nothing after it."""
    out = tmp_path / "diverged"
    cmd = pretrain_cmd(
        setup,
        out,
        "--steps",
        "8",
        "--save-every",
        "2",
        "--max-skipped-steps",
        "3",
        launcher=torchrun(2, str(WORKERS / "pretrain_fault.py"), "nan-on", "1", "3"),
    )
    result = run(cmd)
    assert result.returncode != 0
    assert "3 steps in a row (up to step 5) had a non-finite loss or gradient" in result.stderr, result.stderr[-3000:]
    assert [m["skipped"] for m in metrics(out)] == [False, False, True, True, True]
    # step 4's checkpoint holds step 2's weights (skipped steps change nothing); none is saved after the error
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (out / "checkpoints" / "step-00000006").exists()


def test_resume_auto_refuses_a_dangling_latest(setup, tmp_path):
    """A `latest` naming a checkpoint that is gone is an error naming it, not a silent restart from step 0."""
    out = tmp_path / "dangling"
    assert run(pretrain_cmd(setup, out, "--steps", "2")).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    result = run(pretrain_cmd(setup, out, "--steps", "4", "--resume", "auto"))
    assert result.returncode != 0
    assert "names 'step-00000002', which does not exist" in result.stderr and "--resume PATH" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the run was overwritten


@pytest.fixture(scope="module")
def held_out(setup) -> Path:
    """Shards of stdlib text the runs never train on, with the runs' vocabulary."""
    seen = {" ".join(p) for p in stdlib_documents(limit_bytes=150_000)}
    docs = [" ".join(p) for p in stdlib_documents(limit_bytes=230_000) if " ".join(p) not in seen]
    assert len(docs) >= 4
    (setup["root"] / "held_out.txt").write_text("\n\n".join(docs) + "\n")
    out = setup["root"] / "held_out"
    prepare(
        [str(setup["root"] / "held_out.txt")],
        out,
        PrepareOptions(vocab=str(setup["root"] / "vocab.txt"), seq_len=64),
        progress=False,
    )
    return out


def test_held_out_loss_is_logged_and_equals_transformers_on_the_same_masks(setup, held_out, tmp_path):
    """--eval-data: rows at every --eval-every step and the last carry the held-out MLM loss and accuracy; at the
    end it equals transformers' masked-token cross-entropy of the exported model on the same fixed masks, and two
    ranks (each scoring half the samples) log the same figures as one (dropout off, so that their weights agree)."""
    import transformers

    from fastbert.data.masking import MaskingCollator
    from fastbert.data.shards import ShardDataset

    out = tmp_path / "evaluated"
    evaluated = ("--steps", "3", "--eval-data", str(held_out), "--eval-every", "2", "--dropout", "0")
    result = run(pretrain_cmd(setup, out, *evaluated))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    assert ["eval_mlm_loss" in r for r in rows] == [False, True, True]
    assert all(0 <= r["eval_mlm_accuracy"] <= 1 and 0 <= r["eval_sentence_accuracy"] <= 1 for r in rows[1:])

    assert run([sys.executable, "-m", "fastbert", "export", str(out), "--out", str(tmp_path / "hf")]).returncode == 0
    hf = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    data = ShardDataset(held_out)
    ids = data.special_ids
    collate = MaskingCollator(hf.config.vocab_size, list(ids.values()), ids["mask"], seed=0, padded=True)
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(data), 16):
        indices = list(range(start, min(start + 16, len(data))))
        batch = collate([data[i] for i in indices], indices, [0] * len(indices))
        with torch.no_grad():
            logits = hf(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            ).prediction_logits.double()
        keep = batch["labels"] != -100
        total += torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum").item()
        correct += int((logits[keep].argmax(-1) == batch["labels"][keep]).sum())
        count += int(keep.sum())
    assert rows[-1]["eval_mlm_loss"] == pytest.approx(total / count, rel=1e-5)
    assert rows[-1]["eval_mlm_accuracy"] == pytest.approx(correct / count, abs=1e-9)

    two = tmp_path / "evaluated2"
    result = run(
        pretrain_cmd(
            setup,
            two,
            *evaluated,
            launcher=torchrun(2, "-m", "fastbert"),
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(rows, metrics(two), strict=True):
        for key in ("eval_mlm_loss", "eval_sentence_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)


def test_a_budget_run_follows_its_clock_resumes_on_it_and_ends_at_it(setup, held_out, tmp_path):
    """--budget: stopped early by --max-minutes and resumed, the run's rate at every step is the budget schedule's
    at the clock the step before logged (rank 0's, carried over the resume), and it ends by itself before the budget
    with a checkpoint and a held-out evaluation. A budget the start-up alone spends is refused before training."""
    from fastbert.optim import budget_lr

    out, budget = tmp_path / "budget", 30.0
    args = ("--steps", "100000", "--budget", f"{budget:g}s", "--warmup", "0.1", "--eval-data", str(held_out))
    first = run(pretrain_cmd(setup, out, *args, "--max-minutes", "0.2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at the --max-minutes 0.2 budget, checkpoint saved" in first.stdout
    stopped_at = len(metrics(out))
    resumed = run(pretrain_cmd(setup, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) > stopped_at + 5
    clocks = [r["clock"] for r in rows]
    assert all(a < b for a, b in zip(clocks, clocks[1:], strict=False))  # the clock goes on over the resume
    for before, row in zip(rows, rows[1:], strict=False):
        if row["step"] != stopped_at + 1:  # the resumed process's first rate follows its start-up clock
            want = budget_lr(row["step"] - 1, before["clock"] / budget, 5e-3, 0.1)
            assert row["lr"] == pytest.approx(want, rel=1e-9), row["step"]
    # Ended near the budget, the rate decayed. The run stops when another step like the last one, the closing
    # evaluation and the save would overrun; on a loaded machine the last step can be a little slower than the one
    # before it, so it may end up to 2% past the budget (a step here is ~0.3 s, 1% of it).
    assert clocks[-1] < budget * 1.02 and rows[-1]["lr"] < 5e-3 * 0.25
    assert "eval_mlm_loss" in rows[-1]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{rows[-1]['step']:08d}"

    short = run(pretrain_cmd(setup, tmp_path / "short", "--budget", "0.5s"))
    assert short.returncode != 0
    assert "--budget 0.5s (0.5 s) is spent before the first step: start-up took" in short.stderr, short.stderr[-2000:]
