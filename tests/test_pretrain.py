"""The pretraining driver end to end on CPU/gloo: exact resume after SIGKILL, launchers agreeing, export loaded by
transformers, and bad setups refused before the first step."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastbert.data.corpus import stdlib_documents
from fastbert.data.prepare import PrepareOptions, prepare

MODEL = {"vocab_size": 1500, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 128}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
    prepare([str(root / "corpus.txt")], root / "data", PrepareOptions(vocab=str(root / "vocab.txt"), seq_len=64),
            progress=False)
    prepare([str(root / "corpus.txt")], root / "data128", PrepareOptions(vocab=str(root / "vocab.txt"), seq_len=128,
                                                                         objective="nsp"), progress=False)
    (root / "model.json").write_text(json.dumps({**MODEL, "vocab_size": vocab_size}))
    return {"root": root, "data": root / "data", "data128": root / "data128", "model": root / "model.json"}


def pretrain_cmd(setup, out: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m", "fastbert")):
    return [*launcher, "pretrain", "--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out),
            "--global-batch", "8", "--micro-batch", "2", "--steps", "8", "--lr", "5e-3", "--warmup", "2",
            "--no-progress", *extra]


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **kw.pop("env", {})}, timeout=timeout,
                            **kw)
    return result


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(setup) -> Path:
    out = setup["root"] / "reference"
    result = run(pretrain_cmd(setup, out, "--dropout", "0.1", "--save-every", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigkill_and_resume_reproduce_the_loss_sequence(setup, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(setup, out, "--dropout", "0.1", "--save-every", "2"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill after step 3, around step 4's checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A half-written newer checkpoint must not be picked up.
    partial = out / "checkpoints" / "step-00000099"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in {"step-00000002", "step-00000004", "step-00000006"}  # complete, and short of the last step
    result = run(pretrain_cmd(setup, out, "--dropout", "0.1", "--save-every", "2", "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in result.stderr
    ref, got = losses(reference_run), losses(out)
    assert len(got) == len(ref) == 8
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= 1e-7, (ref, got)


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
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels",
                                    "next_sentence_label")}
    with torch.no_grad():
        a, b = ours(**inputs).loss.item(), hf(**inputs).loss.item()
    assert abs(a - b) <= 1e-5
    trained = torch.load(next((reference_run / "checkpoints" / "step-00000008").glob("mp_rank_*")),
                         weights_only=False)["module"]
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in trained.items())


def test_torchrun_and_deepspeed_launchers_agree(setup, reference_run, tmp_path):
    ref = losses(reference_run)
    dropout0 = ("--dropout", "0")
    single = tmp_path / "single"
    assert run(pretrain_cmd(setup, single, *dropout0)).returncode == 0
    expected = losses(single)
    assert abs(expected[0] - ref[0]) < 0.5  # same data, same init; dropout differs
    torchrun = tmp_path / "torchrun"
    result = run(pretrain_cmd(setup, torchrun, *dropout0, "--zero-stage", "2", launcher=(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611", "-m",
        "fastbert")))
    assert result.returncode == 0, result.stderr[-3000:]
    ds = tmp_path / "deepspeed"
    result = run(pretrain_cmd(setup, ds, *dropout0, "--zero-stage", "1", launcher=(
        "deepspeed", "--num_accelerators", "2", "--master_port", "29612", "--module", "fastbert")))
    assert result.returncode == 0, result.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    nodes = tmp_path / "nodes"
    procs = [subprocess.Popen(pretrain_cmd(setup, nodes, *dropout0, launcher=(
        "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr", "127.0.0.1",
        "--master_port", "29613", "--module", "fastbert")), env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    for other in (torchrun, ds, nodes):
        got = losses(other)
        assert max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True)) <= 1e-5, (other.name, got)
    # The gradient norm before clipping: LAMB's own without ZeRO, DeepSpeed's ZeRO optimizer's with it.
    norms = {r.name: [json.loads(line)["grad_norm"] for line in (r / "metrics.jsonl").open()]
             for r in (single, torchrun, ds)}
    assert all(n is not None and math.isfinite(n) and n > 0 for ns in norms.values() for n in ns), norms
    assert max(norms["single"]) > 1.0  # clipping (at 1.0) was active, so the norms are taken before it
    for name in ("torchrun", "deepspeed"):
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
        "sys.exit(main())\n")
    cmd = pretrain_cmd(setup, tmp_path / "dead", "--save-every", "2", launcher=(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29614",
        str(script)))
    start = time.time()
    result = run(cmd, timeout=300)
    assert result.returncode != 0
    assert time.time() - start < 240


def test_plot_writes_a_png(reference_run):
    result = run([sys.executable, "-m", "fastbert", "plot", str(reference_run)])
    assert result.returncode == 0, result.stderr
    assert (reference_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_saves_a_checkpoint_and_stops(setup, tmp_path):
    out = tmp_path / "term"
    cmd = pretrain_cmd(setup, out)
    cmd[cmd.index("--steps") + 1] = "500"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    done = len(metrics.read_text().splitlines())
    assert f"stopped by signal after step {done}" in err
    assert (out / "checkpoints" / "latest").read_text() == f"step-{done:08d}"


def test_phase_two_starts_from_phase_one_weights(setup, reference_run, tmp_path):
    from safetensors.torch import load_file

    cmd = pretrain_cmd(setup, tmp_path / "phase2", "--init-from", str(reference_run), "--reset-optimizer",
                       "--lr", "0", "--steps", "1")
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
