"""One GPU acceptance run: everything that needs a CUDA GPU to be believed, in one command, under 7 minutes.

Sections, each in a process of its own with a time budget (a section that fails or runs out of time is recorded
and the run goes on; the exit status is 1 when any failed):

- setup (with ``--setup``): the wheels of ``.whl/`` (benchmarks/gpu_wheels.sh) and ``pip install -e .
  --no-build-isolation --no-deps`` (the C++ tokenizer with its CUDA kernel);
- environment: versions, the device and its entry in fastbert/train/flops.py's peak table;
- kernel_tests: ``pytest tests/kernels`` with ``FASTBERT_KERNEL_DEVICE=cuda``: every kernel natively on CUDA
  tensors in fp32, bf16 and fp16 against its float64 reference, with the interpreter's tolerances;
- kernel_bench: benchmarks/bench_kernels.py's measurement (each kernel forward + backward against SDPA flash,
  ``F.layer_norm``, bias + ``F.gelu``, full-logits ``F.cross_entropy``, a ``torch._foreach`` LAMB and DeepSpeed's
  fused LAMB): ms, TFLOP/s or GB/s, share of peak, peak memory of the loss;
- pretrain: ``fastbert prepare-data`` on the installed Python's standard-library docstrings with a WordPiece vocab
  trained on them, then ``fastbert pretrain --model base --precision bf16`` (seq 128, 20 steps) with ZeRO-0 and
  ZeRO-2 on one process, and transformers' ``BertForPreTraining`` (SDPA, bf16 autocast, fused AdamW) on the same
  batches: tokens/s, MFU, peak memory;
- finetune: 30 steps of ``fastbert finetune`` (classification) on a base model;
- tokenizer: the CUDA WordPiece matcher against the C++ CPU path on 10 MB of Python sources: same ids, MB/s;
- deberta: DeBERTa-v3-base's attention block (projections and disentangled attention) forward + backward in bf16
  at sequence 512 and 2048: fastbert's fused kernel against transformers' eager ``DisentangledSelfAttention`` on
  the same weights, and FlashDeBERTa / DisentangledFlash where their wheels are installed; every output and input
  gradient checked against transformers' in fp32.

One JSON file (``$OUT/gpu_acceptance.json`` when ``OUT`` is set, else ``--out DIR``, else
benchmarks/results/gpu_acceptance.json) and a table on stdout; each section's log lies beside the JSON (in
``gpu_acceptance_logs/``) when ``$OUT`` or ``--out`` is given.

``--dry-run`` runs the same code on the CPU so that it cannot rot (tests/test_gpu_acceptance.py, in CI): a few
kernel tests under the Triton interpreter, the kernel measurement at tiny shapes under the interpreter (timed with
``time.perf_counter``), ``--model tiny`` for a few steps on a small text, and the tokenizer's CPU half (the CUDA
comparison is recorded as skipped: no CUDA). On the GPU machine (no network; wheels from benchmarks/gpu_wheels.sh):

    bash benchmarks/gpu_wheels.sh                       # here, once: .whl/ (carried with the call)
    python3 benchmarks/gpu_acceptance.py --setup        # there
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
SECTIONS = ("setup", "environment", "kernel_tests", "kernel_bench", "pretrain", "finetune", "tokenizer", "deberta")

# Seconds each section may take. On the GPU they add up to under 7 minutes (the setup's build included); a section
# may also use what the ones before it left unused, never what the ones after it are owed.
BUDGETS = {
    "gpu": {
        "setup": 65,
        "environment": 15,
        "kernel_tests": 100,
        "kernel_bench": 45,
        "pretrain": 95,
        "finetune": 30,
        "tokenizer": 15,
        "deberta": 50,
    },
    "dry": {
        "setup": 60,
        "environment": 30,
        "kernel_tests": 90,
        "kernel_bench": 60,
        "pretrain": 150,
        "finetune": 60,
        "tokenizer": 30,
        "deberta": 60,
    },
}
TOTAL_S = {mode: sum(budgets.values()) for mode, budgets in BUDGETS.items()}  # GPU: 415 s

# What each profile runs.
PROFILES = {
    "gpu": {
        "model": "base",
        "corpus_bytes": 3_000_000,
        "vocab_size": 30522,
        "seq_len": 128,
        "steps": 20,
        "warmup_steps": 5,  # left out of the throughput (kernel compilation, allocator warm-up)
        "global_batch": 256,
        "micro_batch": 128,
        "zero_stages": (0, 2),
        "finetune_steps": 30,
        "finetune_batch": 32,
        "tokenizer_bytes": 10_000_000,
        # DeBERTa-v3-base's attention: (sequence, batch) pairs, bf16
        "deberta_shape": {},
        "deberta_seqs": ((512, 16), (2048, 4)),
    },
    "dry": {
        "model": "tiny",
        "corpus_bytes": 150_000,
        "vocab_size": 1500,
        "seq_len": 64,
        "steps": 3,
        "warmup_steps": 1,
        "global_batch": 4,
        "micro_batch": 2,
        "zero_stages": (2,),  # ZeRO-0 is the same code but the stage; each launch costs CI seconds
        "finetune_steps": 3,
        "finetune_batch": 8,
        "tokenizer_bytes": 300_000,
        # past the bucket boundary (4 buckets a side), fp32 under the interpreter
        "deberta_shape": {
            "hidden_size": 64,
            "num_attention_heads": 2,
            "position_buckets": 4,
            "max_relative_positions": 16,
        },
        "deberta_seqs": ((32, 1),),
    },
}
# Under the interpreter each kernel test costs seconds: one case per kernel and dtype, the dispatch and LAMB's
# skipped-step checks.
DRY_KERNEL_TESTS = [
    *(f"tests/kernels/test_bias_gelu.py::test_bias_gelu_matches_reference[shape4-dtype{d}]" for d in range(3)),
    *(
        "tests/kernels/test_residual_layer_norm.py::test_residual_layer_norm_matches_reference"
        f"[(2,7)-True-True-True-dtype{d}]"
        for d in range(3)
    ),
    *(
        f"tests/kernels/test_attention.py::test_varlen_attention_matches_reference[lengths6-32-dtype{d}]"
        for d in range(3)
    ),
    *(
        f"tests/kernels/test_mlm_loss.py::test_mlm_loss_matches_reference[1-1000-64-None-0.0-dtype{d}]"
        for d in range(3)
    ),
    "tests/kernels/test_bias_gelu.py::test_ops_dispatches_to_the_kernel",
    "tests/kernels/test_fused_lamb.py::test_a_skipped_first_step_leaves_the_optimizer_as_new[triton]",
]
XDIST_WORKERS = 12
# Ahead-of-time compiles and their machine-code checks: CPU work that needs no GPU (and would cost the GPU run
# minutes); they run where the suite runs.
COMPILE_ONLY_TESTS = ("tests/kernels/test_aot_compile.py", "tests/kernels/test_machine_code.py")


def base_env(dry: bool) -> dict:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("TRITON_INTERPRET", None)
    env.pop("FASTBERT_KERNEL_DEVICE", None)
    env.pop("FASTBERT_BACKEND", None)
    return env


def run(cmd: list[str], timeout: float, log, env: dict | None = None, cwd: Path = ROOT) -> int:
    """``cmd`` in a session of its own, its output appended to ``log``; past ``timeout`` seconds the whole group is
    killed and TimeoutError raised."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    proc = subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError(
            f"{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:4]))} ... ran past {timeout:.0f} s"
        ) from None


class SectionFailed(Exception):
    """A section ran but what it checks does not hold."""


# Shared data ----------------------------------------------------------------------------------------------------
def ensure_data(ctx: dict) -> dict:
    """A real-text corpus, a WordPiece vocabulary trained on it (padded with [unused] tokens to the profile's size)
    and prepare-data's shards of it, made once in the work directory and reused by later sections."""
    work, profile = Path(ctx["work"]), ctx["profile"]
    data = work / "data"
    done = data / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    data.mkdir(parents=True, exist_ok=True)
    from fastbert.data.corpus import stdlib_documents

    started = time.perf_counter()
    corpus = data / "corpus.txt"
    docs = stdlib_documents(limit_bytes=profile["corpus_bytes"])
    corpus.write_text("\n\n".join("\n".join(paragraphs) for paragraphs in docs) + "\n", encoding="utf-8")
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train([str(corpus)], vocab_size=profile["vocab_size"], min_frequency=2, show_progress=False)
    trainer.save_model(str(data))
    vocab = data / "vocab.txt"
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    learned = len(tokens)
    tokens += [f"[unused{i}]" for i in range(profile["vocab_size"] - len(tokens))]
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    shards = data / "shards"
    cmd = [sys.executable, "-m", "fastbert", "prepare-data", corpus, "--vocab", vocab, "--out", shards]
    rc = run([*cmd, "--seq-len", str(profile["seq_len"])], ctx["remaining"](), ctx["log"], ctx["env"])
    if rc != 0:
        raise SectionFailed(f"fastbert prepare-data exited with {rc}")
    meta = json.loads((shards / "meta.json").read_text())
    info = {
        "corpus": str(corpus),
        "corpus_bytes": corpus.stat().st_size,
        "vocab": str(vocab),
        "vocab_learned": learned,
        "vocab_size": len(tokens),
        "shards": str(shards),
        "samples": meta["num_samples"],
        "tokens": meta["num_tokens"],
        "seconds": time.perf_counter() - started,
    }
    done.write_text(json.dumps(info))
    return info


# Sections -------------------------------------------------------------------------------------------------------
def section_setup(ctx: dict) -> dict:
    if not ctx["setup"]:
        return {"skipped": "not asked for (--setup installs .whl/ and builds the extension)"}
    log = ctx["log"]
    # No network there: --no-index everywhere; an image's system Python may be marked externally managed.
    env = {**ctx["env"], "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", WHEELS]
    result = {}
    if WHEELS.is_dir():
        rc = run([*pip, "setuptools>=77", "wheel", "deepspeed", "blingfire"], ctx["remaining"](), log, env)
        if rc != 0:
            raise SectionFailed(
                f"pip install of setuptools, wheel, deepspeed and blingfire from {WHEELS} exited with {rc}"
            )
        result["xdist"] = run([*pip, "pytest-xdist"], ctx["remaining"](), log, env) == 0  # optional
        # The deberta section's comparisons (pure-Python Triton packages; optional, skipped there when absent).
        others = [*pip, "--no-deps", "einops", "flashdeberta", "disentangled-flash"]
        result["deberta_others"] = run(others, ctx["remaining"](), log, env) == 0
    else:
        result["wheels"] = f"no {WHEELS}: nothing installed from wheels"
    started = time.perf_counter()
    build = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", ROOT]
    import torch

    if torch.cuda.is_available():  # the CUDA tokenizer kernel for this GPU only: half the nvcc time of 80;90
        major, minor = torch.cuda.get_device_capability()
        env = {**env, "FASTBERT_CUDA_ARCHS": f"{major}{minor}"}
    rc = run(build, ctx["remaining"](), log, env)
    if rc != 0:
        raise SectionFailed(f"pip install -e . (the C++ extension build) exited with {rc}")
    result["build_seconds"] = time.perf_counter() - started
    return result


def section_environment(ctx: dict) -> dict:
    import torch

    import fastbert
    from fastbert import _wordpiece
    from fastbert.train.flops import gpu_peak

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "fastbert": fastbert.__version__}
    for name in ("triton", "transformers", "tokenizers", "deepspeed", "blingfire", "xdist"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception as e:  # deepspeed may fail in odd ways on import
            versions[name] = f"missing: {type(e).__name__}: {e}"[:200]
    result = {"versions": versions, "cuda": torch.cuda.is_available(), "tokenizer_cuda_kernel": _wordpiece.with_cuda}
    if torch.cuda.is_available():
        peak = gpu_peak()
        result.update(
            device=torch.cuda.get_device_name(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            cuda_version=torch.version.cuda,
            peak=None if peak is None else peak.__dict__,
        )
        if peak is None:
            raise SectionFailed(f"{result['device']} is not in fastbert/train/flops.py's peak table")
    elif not ctx["dry"]:
        raise SectionFailed("torch sees no CUDA device")
    missing = [k for k in ("triton", "transformers", "deepspeed", "blingfire") if versions[k].startswith("missing")]
    if missing:
        raise SectionFailed(f"missing: {', '.join(missing)}")
    return result


def _junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed, by_file = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        module = case.get("classname", "").split(".")[-1] or "?"
        by_file[module] = by_file.get(module, 0) + 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            failed.append(f"{name} (skipped)")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "by_file": by_file, "not_passed": failed[:30]}


def section_kernel_tests(ctx: dict) -> dict:
    env = dict(ctx["env"])
    xml = Path(ctx["work"]) / "kernel_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit1",
    ]
    if ctx["dry"]:
        cmd += DRY_KERNEL_TESTS  # the interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1)
        where = "cpu (Triton interpreter)"
    else:
        env["FASTBERT_KERNEL_DEVICE"] = "cuda"  # native: conftest.py fails the run when there is no GPU
        cmd += ["tests/kernels", *(f"--ignore={path}" for path in COMPILE_ONLY_TESTS)]
        where = "cuda (native)"
        try:
            import xdist  # noqa: F401

            cmd += ["-n", str(XDIST_WORKERS)]
        except ImportError:
            pass
    started = time.perf_counter()
    rc = run(cmd, ctx["remaining"](), ctx["log"], env)
    seconds = time.perf_counter() - started
    if not xml.exists():
        raise SectionFailed(f"pytest exited with {rc} and wrote no report")
    counts = _junit_counts(xml)
    result = {"where": where, "exit_status": rc, "seconds": seconds, **counts}
    if rc != 0 or counts["tests"] == 0 or counts["passed"] != counts["tests"]:
        raise SectionFailed(
            f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped of {counts['tests']}"
            f" (exit {rc}): {', '.join(counts['not_passed'][:5])}",
            result,
        )
    return result


def section_kernel_bench(ctx: dict) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kernels
    import torch

    device = "cpu" if ctx["dry"] else "cuda"
    if not ctx["dry"] and not torch.cuda.is_available():
        raise SectionFailed("no CUDA device")
    shapes = bench_kernels.TINY if ctx["dry"] else bench_kernels.BERT_BASE
    ds_ready = (Path(ctx["work"]) / "deepspeed_lamb.ok").exists()
    table = bench_kernels.measure(device, shapes, deepspeed_lamb=ds_ready, reps=1 if ctx["dry"] else 3)
    broken = [
        f"{r['kernel']} ({r['shape']}): {r['error']}"
        for r in table["results"]
        if r["provider"] == "fastbert" and "error" in r
    ]
    if broken:
        raise SectionFailed("fastbert kernels failed: " + "; ".join(broken)[:1000], table)
    return table


def _runner(out: Path) -> list[str]:
    """``python -c`` running the fastbert CLI in this process and then recording its peak CUDA memory."""
    code = (
        "import json, sys, torch\n"
        "from fastbert.cli import main\n"
        "rc = main(sys.argv[2:])\n"
        "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
        "open(sys.argv[1], 'w').write(json.dumps({'exit_status': rc, 'peak_memory': peak}))\n"
        "sys.exit(rc)\n"
    )
    return [sys.executable, "-c", code, str(out)]


def _throughput(rows: list[dict], global_batch: int, skip: int) -> dict:
    """tokens/s and MFU over the steps after the first ``skip`` (each step's time is its samples over samples/s)."""
    timed = rows[skip:] or rows
    seconds = [global_batch / r["samples_per_s"] for r in timed]
    tokens = [r["tokens_per_s"] * s for r, s in zip(timed, seconds, strict=True)]
    mfu = None
    if all(r.get("mfu") is not None for r in timed):
        mfu = sum(r["mfu"] * s for r, s in zip(timed, seconds, strict=True)) / sum(seconds)
    return {
        "timed_steps": len(timed),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "step_ms": 1e3 * sum(seconds) / len(seconds),
        "mfu": mfu,
    }


def _fastbert_pretrain(ctx: dict, data: dict, stage: int) -> dict:
    profile, work = ctx["profile"], Path(ctx["work"])
    run_dir = work / f"pretrain-zero{stage}"
    memory = work / f"pretrain-zero{stage}.json"
    args = [
        "pretrain",
        "--model",
        profile["model"],
        "--data",
        data["shards"],
        "--out",
        run_dir,
        "--seq-len",
        str(profile["seq_len"]),
        "--precision",
        "bf16",
        "--steps",
        str(profile["steps"]),
        "--zero-stage",
        str(stage),
        "--global-batch",
        str(profile["global_batch"]),
        "--micro-batch",
        str(profile["micro_batch"]),
        "--warmup",
        "2",
        "--no-progress",
    ]
    started = time.perf_counter()
    rc = run([*_runner(memory), *args], ctx["remaining"](), ctx["log"], ctx["env"])
    wall = time.perf_counter() - started
    if rc != 0:
        raise SectionFailed(f"fastbert pretrain --zero-stage {stage} exited with {rc}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(rows) != profile["steps"]:
        raise SectionFailed(f"ZeRO-{stage}: {len(rows)} metrics rows for {profile['steps']} steps")
    losses = [r["loss"] for r in rows]
    if not all(math.isfinite(x) for x in losses) or any(r["skipped"] for r in rows):
        raise SectionFailed(f"ZeRO-{stage}: non-finite or skipped steps: losses {losses}")
    result = {
        **_throughput(rows, profile["global_batch"], profile["warmup_steps"]),
        "peak_memory": json.loads(memory.read_text())["peak_memory"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_seconds": wall,
        "setup": f"fastbert pretrain, DeepSpeed ZeRO-{stage}, LAMB, fastbert kernels, 1 process",
    }
    if not ctx["dry"] and result["mfu"] is None:
        raise SectionFailed(f"ZeRO-{stage}: metrics.jsonl has no MFU (is the device in the peak table?)")
    return result


def _hf_pretrain(ctx: dict, data: dict) -> dict:
    """transformers' BertForPreTraining on the very batches fastbert's runs draw (same plan and masking, padded),
    SDPA attention, bf16 autocast, fused AdamW, timed from one optimizer step's end to the next."""
    import torch
    import transformers

    from fastbert.config import BertConfig
    from fastbert.data.masking import MaskingCollator
    from fastbert.data.sampler import MicroBatchDataset, MicroBatchPlan
    from fastbert.data.shards import ShardDataset
    from fastbert.train.flops import peak_flops, training_flops

    profile = ctx["profile"]
    device = torch.device("cuda" if torch.cuda.is_available() and not ctx["dry"] else "cpu")
    dataset = ShardDataset(data["shards"])
    vocab = Path(data["vocab"]).read_text(encoding="utf-8").splitlines()
    special = dataset.special_ids
    collate = MaskingCollator(
        len(vocab), list(special.values()), special["mask"], seed=0, padded=True, pad_id=special["pad"]
    )
    plan = MicroBatchPlan(
        num_samples=len(dataset), global_batch=profile["global_batch"], micro_batch=profile["micro_batch"], seed=0
    )
    batches = MicroBatchDataset(dataset, plan, collate)
    config = BertConfig.preset(profile["model"], vocab_size=len(vocab))
    fields = {
        k: v for k, v in config.to_dict().items() if k not in ("share_layers", "pre_layer_norm", "sentence_objective")
    }
    hf_config = transformers.BertConfig(**fields)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(hf_config).to(device).train()
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fused = True
    except (RuntimeError, TypeError):  # fused AdamW needs a device that has it
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fused = False
    peak = peak_flops(device, "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows, position = [], 0
    sync()
    tick = time.perf_counter()
    for _ in range(profile["steps"]):
        tokens = squares = masked = sequences = 0
        for _ in range(plan.accumulation):
            batch = batches[position]
            position += 1
            lengths = batch["attention_mask"].sum(1)
            tokens += int(lengths.sum())
            squares += int((lengths * lengths).sum())
            masked += int((batch["labels"] != -100).sum())
            sequences += len(lengths)
            inputs = {
                k: batch[k].to(device, non_blocking=True)
                for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
            }
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**inputs).loss
            (loss / plan.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed, tick = time.perf_counter() - tick, time.perf_counter()
        flops = training_flops(config, tokens=tokens, squared_lengths=squares, sequences=sequences, masked=masked)
        rows.append(
            {
                "loss": float(loss),
                "samples_per_s": sequences / elapsed,
                "tokens_per_s": tokens / elapsed,
                "mfu": None if peak is None else flops / elapsed / peak,
            }
        )
        tick = time.perf_counter()  # the loss read-back is not the model's time
    if not all(math.isfinite(r["loss"]) for r in rows):
        raise SectionFailed(f"transformers: non-finite loss {[r['loss'] for r in rows]}")
    return {
        **_throughput(rows, profile["global_batch"], profile["warmup_steps"]),
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "setup": f"transformers {transformers.__version__} BertForPreTraining, SDPA, bf16 autocast, "
        f"{'fused ' if fused else ''}AdamW; MFU by fastbert's count (real tokens, masked rows)",
    }


def section_pretrain(ctx: dict) -> dict:
    data = ensure_data(ctx)
    profile = ctx["profile"]
    result = {
        "model": profile["model"],
        "seq_len": profile["seq_len"],
        "global_batch": profile["global_batch"],
        "micro_batch": profile["micro_batch"],
        "steps": profile["steps"],
        "data": {k: data[k] for k in ("corpus_bytes", "vocab_size", "vocab_learned", "samples", "tokens")},
    }
    errors = []
    runs = [
        (f"fastbert_zero{stage}", lambda stage=stage: _fastbert_pretrain(ctx, data, stage))
        for stage in profile["zero_stages"]
    ]
    for name, fn in (*runs, ("transformers", lambda: _hf_pretrain(ctx, data))):
        try:
            result[name] = fn()
        except Exception as e:  # each run on its own: record, go on with the next
            result[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            errors.append(f"{name}: {e}")
            ctx["log"].write(traceback.format_exc())
    ours, theirs = result.get("fastbert_zero0", {}), result.get("transformers", {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        result["speedup_zero0_vs_transformers"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    if "tokens_per_s" in result.get("fastbert_zero2", {}) and "tokens_per_s" in theirs:
        result["speedup_zero2_vs_transformers"] = result["fastbert_zero2"]["tokens_per_s"] / theirs["tokens_per_s"]
    if errors:
        raise SectionFailed("; ".join(errors)[:1000], result)
    return result


def section_finetune(ctx: dict) -> dict:
    """``fastbert finetune`` for the profile's steps (one epoch) on a randomly initialised model of the pretraining
    size with the trained vocab: the task is whether a stdlib line is a ``# comment`` or a docstring's sentence."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from comment_or_docstring import stdlib_comment_or_docstring

    from fastbert import BertConfig, BertForPreTraining

    data = ensure_data(ctx)
    profile, work = ctx["profile"], Path(ctx["work"])
    model_dir = work / "finetune-model"
    model_dir.mkdir(exist_ok=True)
    vocab = Path(data["vocab"]).read_text(encoding="utf-8")
    torch.manual_seed(0)
    BertForPreTraining(BertConfig.preset(profile["model"], vocab_size=len(vocab.splitlines()))).save_pretrained(
        model_dir
    )
    (model_dir / "vocab.txt").write_text(vocab, encoding="utf-8")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    examples = profile["finetune_steps"] * profile["finetune_batch"]
    train = work / "finetune-train.jsonl"
    rows = stdlib_comment_or_docstring(examples, seed=0)
    train.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out, memory = work / "finetune-run", work / "finetune.json"
    args = [
        "finetune",
        "--task",
        "classify",
        "--model",
        model_dir,
        "--train",
        train,
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        str(profile["finetune_batch"]),
        "--max-length",
        "128",
        "--no-progress",
    ]
    started = time.perf_counter()
    rc = run([*_runner(memory), *args], ctx["remaining"](), ctx["log"], ctx["env"])
    wall = time.perf_counter() - started
    if rc != 0:
        raise SectionFailed(f"fastbert finetune exited with {rc}")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = {
        "examples": len(rows),
        "steps": record["step"],
        "train_loss": record["train_loss"],
        "train_examples_per_s": record["train_examples_per_s"],
        "train_seconds": record["train_seconds"],
        "peak_memory": json.loads(memory.read_text())["peak_memory"],
        "wall_seconds": wall,
        "precision": json.loads((out / "eval_results.json").read_text()).get("precision"),
    }
    if record["step"] != profile["finetune_steps"] or not math.isfinite(record["train_loss"]):
        raise SectionFailed(
            f"{record['step']} steps (wanted {profile['finetune_steps']}), loss {record['train_loss']}", result
        )
    if not ctx["dry"] and result["precision"] != "bf16":
        raise SectionFailed(f"fine-tuned in {result['precision']}, not bf16 autocast on the GPU", result)
    return result


def _python_sources(limit: int) -> str:
    """The installed Python's own .py files, in sorted order, up to ``limit`` bytes: real text every machine has."""
    import sysconfig

    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text.encode("utf-8"))
        if total >= limit:
            break
    return "".join(parts)


def section_tokenizer(ctx: dict) -> dict:
    """The CUDA matcher (words split on the CPU, then matched on the GPU: ``_core.split_words`` +
    ``_core.match_words_cuda``) against the C++ CPU path (``_core.encode``) on the same text: the same ids, MB/s."""
    import torch

    from fastbert import _wordpiece
    from fastbert.tokenizer import WordPieceTokenizer

    data = ensure_data(ctx)
    tokenizer = WordPieceTokenizer.from_vocab(data["vocab"], do_lower_case=True)
    core = tokenizer._core
    text = _python_sources(ctx["profile"]["tokenizer_bytes"])
    mb = len(text.encode("utf-8")) / 1e6

    def timed(fn):
        started = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - started

    cpu_ids, cpu_s = timed(lambda: core.encode(text))
    lines = text.splitlines()
    (flat, _), threads_s = timed(lambda: tokenizer.encode_batch_flat(lines, add_special_tokens=False))
    if flat.tolist() != cpu_ids:
        raise SectionFailed("encode_batch_flat over the lines differs from encode of the whole text")
    (words, ends, specials), split_s = timed(lambda: core.split_words(text))
    result = {
        "megabytes": mb,
        "ids": len(cpu_ids),
        "words": len(ends),
        "cpu_encode_mb_per_s": mb / cpu_s,
        "cpu_encode_batch_flat_mb_per_s": mb / threads_s,
        "split_words_mb_per_s": mb / split_s,
    }

    def flatten(per_word) -> list[int]:
        ids = []
        for special, word_ids in zip(specials, per_word, strict=True):
            if special >= 0:
                ids.append(special)
            else:
                ids += word_ids
        return ids

    if not torch.cuda.is_available() or not _wordpiece.with_cuda:
        why = "no CUDA" if not torch.cuda.is_available() else "fastbert._wordpiece was built without its CUDA kernel"
        if not ctx["dry"]:
            raise SectionFailed(why, result)
        # The CPU stand-in for the GPU matcher: the same per-word matcher the kernel runs, one word at a time.
        starts = [0, *ends[:-1]]
        per_word = [core.match_word(words[a:b])[0] for a, b in zip(starts, ends, strict=True)]
        if flatten(per_word) != cpu_ids:
            raise SectionFailed("split_words + match_word differs from encode", result)
        result["cuda"] = f"skipped: {why} (dry run: split_words + match_word on the CPU gave encode's ids)"
        return result
    core.match_words_cuda(*core.split_words(text[:10000])[:2])  # CUDA context and the trie's upload
    per_word, match_s = timed(lambda: core.match_words_cuda(words, ends))
    same = flatten(per_word) == cpu_ids
    result.update(
        cuda_match_mb_per_s=mb / match_s,
        cuda_split_and_match_mb_per_s=mb / (split_s + match_s),
        cuda_vs_cpu=cpu_s / (split_s + match_s),
        same_ids=same,
    )
    if not same:
        raise SectionFailed("the CUDA matcher's ids differ from the CPU path's", result)
    return result


# DeBERTa's attention ----------------------------------------------------------------------------------------------
DEBERTA_TOLERANCE = {"bf16": 3e-2, "fp32": 1e-4}  # relative error (norm) of the output and the input's gradient
DEBERTA_OTHERS = {  # provider -> (module, class): drop-in subclasses of transformers' DisentangledSelfAttention
    "flashdeberta": ("flashdeberta.model", "FlashDisentangledSelfAttention"),
    "disentangled_flash": ("disentangled_flash", "TritonTrainingDisentangledSelfAttention"),
}


def _relative_error(value, reference) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def section_deberta(ctx: dict) -> dict:
    """DeBERTa-v3-base's attention block forward + backward: fastbert (``DebertaLayer``'s attention, the fused
    kernel) against transformers' eager ``DisentangledSelfAttention`` on the same weights and inputs, and the
    drop-in modules of FlashDeBERTa and DisentangledFlash where installed (skipped with the reason otherwise). Each
    provider's output and input gradient are compared with transformers' in fp32; fastbert's must agree, the
    others' errors are recorded. Goals (reported, not enforced): at sequence 512 at least 3x transformers and 1.5x
    DisentangledFlash."""
    import copy
    import importlib

    import torch
    import transformers
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    from fastbert.deberta import DebertaConfig, DebertaLayer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_kernels import peak_memory

    dry, profile = ctx["dry"], ctx["profile"]
    if not dry and not torch.cuda.is_available():
        raise SectionFailed("no CUDA device")
    device = torch.device("cpu" if dry else "cuda")
    dtype, precision = (torch.float32, "fp32") if dry else (torch.bfloat16, "bf16")
    config = DebertaConfig.preset(
        "deberta-base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **profile["deberta_shape"]
    )
    hf_config = transformers.DebertaV2Config(**{k: v for k, v in config.to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    reference32 = hf.DisentangledSelfAttention(hf_config).to(device)  # fp32: what every provider is checked against
    ours = DebertaLayer(config).to(device)
    with torch.no_grad():
        for mine, theirs in [
            (ours.query, reference32.query_proj),
            (ours.key, reference32.key_proj),
            (ours.value, reference32.value_proj),
        ]:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    span = 2 * config.position_span

    def hf_style(module, mask4d):
        module = module.to(dtype)
        return lambda x, mask, table: module(x, mask4d(mask), rel_embeddings=table)[0]

    ours.to(dtype)
    providers = {"fastbert": lambda x, mask, table: ours._attention(x, mask, table, None)}
    providers["transformers_eager"] = hf_style(
        copy.deepcopy(reference32), lambda m: m[:, None, None, :] & m[:, None, :, None]
    )
    notes = {}
    for name, (module_name, class_name) in DEBERTA_OTHERS.items():
        try:
            other = getattr(importlib.import_module(module_name), class_name)(hf_config).to(device)
            loaded = other.load_state_dict(reference32.state_dict(), strict=False)  # their own buffers may differ
            parameters = dict(other.named_parameters())
            unloaded = [k for k in loaded.missing_keys if k in parameters] + list(loaded.unexpected_keys)
            if unloaded:
                raise RuntimeError(f"transformers' weights do not fit: {', '.join(unloaded)[:200]}")
            providers[name] = hf_style(other, lambda m: m)
        except Exception as e:  # not installed, or not importable with this transformers
            notes[name] = f"skipped: {type(e).__name__}: {e}"[:300]

    rows = []
    for seq, batch in profile["deberta_seqs"]:
        gen = torch.Generator().manual_seed(seq)
        x32 = torch.randn(batch, seq, config.hidden_size, generator=gen).to(device)
        table32 = torch.nn.functional.layer_norm(
            torch.randn(span, config.hidden_size, generator=gen), (config.hidden_size,)
        )
        table32 = table32.to(device)
        grad_out = torch.randn(batch, seq, config.hidden_size, generator=gen).to(device)
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        x_ref = x32.clone().requires_grad_()
        out_ref = reference32(x_ref, mask[:, None, None, :] & mask[:, None, :, None], rel_embeddings=table32)[0]
        out_ref.backward(grad_out)
        for name, fn in providers.items():
            row = {"provider": name, "seq": seq, "batch": batch, "precision": precision}
            if name not in ("fastbert", "transformers_eager") and ctx["remaining"]() < 20:
                row["error"] = "skipped: the section's time is nearly spent"  # autotuning others may be long
                rows.append(row)
                continue
            x = x32.to(dtype, copy=True).requires_grad_()
            table, g = table32.to(dtype), grad_out.to(dtype)

            def step(x=x, fn=fn, mask=mask, table=table, g=g):
                x.grad = None
                out = fn(x, mask, table)
                out.backward(g)
                return out

            try:
                started = time.perf_counter()
                out = step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_s = time.perf_counter() - started
                row["output_error"] = _relative_error(out, out_ref)
                row["input_grad_error"] = _relative_error(x.grad, x_ref.grad)
                if device.type == "cuda":
                    from triton.testing import do_bench

                    row["ms"] = float(do_bench(step, warmup=10, rep=50))
                else:
                    row["ms"] = first_s * 1e3  # one call under the interpreter: the dry run only
                row["peak_memory"] = peak_memory(step, device)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["seq"] == row["seq"] and r["provider"] == "transformers_eager")
        if "ms" in row and "ms" in base:
            row["speedup_vs_transformers"] = base["ms"] / row["ms"]
    result = {"precision": precision, "config": config.to_dict(), "results": rows, "not_run": notes}

    def ratio(seq: int, other: str) -> float | None:
        mine = next((r for r in rows if r["seq"] == seq and r["provider"] == "fastbert" and "ms" in r), None)
        theirs_row = next((r for r in rows if r["seq"] == seq and r["provider"] == other and "ms" in r), None)
        return None if mine is None or theirs_row is None else theirs_row["ms"] / mine["ms"]

    first = profile["deberta_seqs"][0][0]
    result["fastbert_vs_transformers"] = ratio(first, "transformers_eager")
    result["fastbert_vs_disentangled_flash"] = ratio(first, "disentangled_flash")
    result["goals"] = {
        f"at_least_3x_transformers_at_{first}": None
        if result["fastbert_vs_transformers"] is None
        else result["fastbert_vs_transformers"] >= 3,
        f"at_least_1.5x_disentangled_flash_at_{first}": None
        if result["fastbert_vs_disentangled_flash"] is None
        else result["fastbert_vs_disentangled_flash"] >= 1.5,
    }
    tolerance = DEBERTA_TOLERANCE[precision]
    wrong = [
        f"seq {r['seq']}: "
        + (r.get("error") or f"output {r['output_error']:.2e}, input grad {r['input_grad_error']:.2e}")
        for r in rows
        if r["provider"] == "fastbert" and ("error" in r or max(r["output_error"], r["input_grad_error"]) > tolerance)
    ]
    if wrong:
        raise SectionFailed(f"fastbert's DeBERTa attention (tolerance {tolerance:g}): " + "; ".join(wrong), result)
    return result


SECTION_FUNCTIONS = {
    "setup": section_setup,
    "environment": section_environment,
    "kernel_tests": section_kernel_tests,
    "kernel_bench": section_kernel_bench,
    "pretrain": section_pretrain,
    "finetune": section_finetune,
    "tokenizer": section_tokenizer,
    "deberta": section_deberta,
}


# A section in its own process -----------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    """Runs one section; writes {"passed", "result", "error"} to --child-out."""
    deadline = args.deadline
    with open(args.child_log, "a") as log:
        ctx = {
            "dry": args.dry_run,
            "profile": PROFILES["dry" if args.dry_run else "gpu"],
            "work": args.work,
            "setup": args.setup,
            "log": log,
            "env": base_env(args.dry_run),
            "remaining": lambda: max(1.0, deadline - time.time() - 2.0),
        }
        outcome: dict = {"passed": True, "result": None, "error": None}
        try:
            outcome["result"] = SECTION_FUNCTIONS[args.child](ctx)
        except Exception as e:
            outcome["passed"] = False
            outcome["error"] = f"{type(e).__name__}: {e.args[0] if e.args else e}"[:2000]
            if isinstance(e, SectionFailed) and len(e.args) > 1:
                outcome["result"] = e.args[1]
            log.write(traceback.format_exc())
    Path(args.child_out).write_text(json.dumps(outcome, default=str))
    return 0


def summary(name: str, record: dict) -> str:
    """One line of the table for a section."""
    try:
        return _summary(name, record)
    except (KeyError, TypeError, ValueError) as e:  # a result without the expected figures: the JSON has it all
        return f"(no summary: {type(e).__name__}: {e})"


def _summary(name: str, record: dict) -> str:
    r = record.get("result") or {}
    if record["status"] != "passed":
        return (record.get("error") or "")[:150]
    if name == "setup":
        return r.get("skipped", f"built in {r.get('build_seconds', 0):.0f} s")[:150]
    if name == "environment":
        return f"{r.get('device', 'no GPU')}, torch {r['versions']['torch']}, triton {r['versions'].get('triton')}"
    if name == "kernel_tests":
        files = ", ".join(f"{k.removeprefix('test_')} {v}" for k, v in r["by_file"].items())
        return f"{r['passed']}/{r['tests']} passed on {r['where']} in {r['seconds']:.0f} s ({files})"
    if name == "kernel_bench":
        rows = [x for x in r["results"] if x["provider"] == "fastbert" and "ms" in x]
        shares = [f"{x['kernel']} {x['share_of_peak']:.0%}" for x in rows if x.get("share_of_peak") is not None]
        return f"{len(rows)} kernel rows; share of peak: {', '.join(shares) or 'n/a (no GPU)'}"
    if name == "pretrain":
        parts = []
        for run_name in ("fastbert_zero0", "fastbert_zero2", "transformers"):
            if run_name not in r:
                continue
            x = r[run_name]
            mfu = f", MFU {x['mfu']:.0%}" if x.get("mfu") is not None else ""
            parts.append(f"{run_name} {x.get('tokens_per_s', 0):.0f} tok/s{mfu}")
        return "; ".join(parts)
    if name == "finetune":
        return f"{r['steps']} steps, {r['train_examples_per_s']:.1f} examples/s, loss {r['train_loss']:.3f}"
    if name == "deberta":
        cells = [
            f"{x['provider']} {x['seq']} {x['ms']:.2f} ms"
            + (f" ({x['speedup_vs_transformers']:.2f}x)" if x["provider"] != "transformers_eager" else "")
            for x in r["results"]
            if "ms" in x
        ]
        return "; ".join(cells)[:150]
    if name == "tokenizer":
        gpu = r.get("cuda", f"CUDA {r.get('cuda_split_and_match_mb_per_s', 0):.1f} MB/s, same ids {r.get('same_ids')}")
        return f"{r['megabytes']:.1f} MB: CPU {r['cpu_encode_mb_per_s']:.1f} MB/s; {gpu}"[:150]
    return ""


def _deepspeed_prebuild(work: Path, log) -> subprocess.Popen | None:
    """DeepSpeed's fused LAMB is a CUDA op built on first use (nvcc, a minute or more): start building it in the
    background now so that the kernel benchmark can load it later; it marks success with deepspeed_lamb.ok."""
    code = (
        "import pathlib, sys\n"
        "from deepspeed.ops.op_builder import FusedLambBuilder\n"
        "FusedLambBuilder().load()\n"
        "pathlib.Path(sys.argv[1]).write_text('ok')\n"
    )
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, str(work / "deepspeed_lamb.ok")],
            env=base_env(False),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: interpreter, tiny shapes, --model tiny")
    parser.add_argument("--setup", action="store_true", help="first install .whl/ and build the C++ extension")
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_acceptance.json (default: $OUT)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-log", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    mode = "dry" if args.dry_run else "gpu"
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    json_path = (out_dir or RESULTS) / "gpu_acceptance.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    work_ctx = contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="gpu-accept-")
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    budgets = BUDGETS[mode]
    started = time.time()
    deadline = started + TOTAL_S[mode]
    report = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "budget_s": TOTAL_S[mode],
        "sections": {},
    }
    prebuild = None
    with work_ctx as work:
        work = Path(work)
        work.mkdir(parents=True, exist_ok=True)
        logs = (out_dir / "gpu_acceptance_logs") if out_dir else (work / "logs")
        logs.mkdir(parents=True, exist_ok=True)
        print(f"gpu_acceptance ({'dry run, CPU' if args.dry_run else 'GPU'}): {', '.join(sections)}; logs in {logs}")
        for i, name in enumerate(sections):
            if name == "kernel_tests" and not args.dry_run and "kernel_bench" in sections:
                prebuild = _deepspeed_prebuild(work, open(logs / "deepspeed_lamb_build.log", "w"))  # noqa: SIM115
            if name == "kernel_bench" and prebuild is not None and prebuild.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(prebuild.pid, signal.SIGKILL)  # not built in time: the benchmark says so
                prebuild.wait()
            section_deadline = deadline - sum(budgets[s] for s in sections[i + 1 :])  # what later ones are owed
            timeout = max(1.0, section_deadline - time.time())
            child_out = work / f"{name}.result.json"
            log_path = logs / f"{name}.log"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--child-out",
                str(child_out),
                "--child-log",
                str(log_path),
                "--work",
                str(work),
                "--deadline",
                str(section_deadline),
            ]
            cmd += ["--dry-run"] * args.dry_run + ["--setup"] * args.setup
            env = base_env(args.dry_run)
            if name in ("kernel_bench", "deberta") and args.dry_run:
                env.update(TRITON_INTERPRET="1", FASTBERT_BACKEND="triton")  # the kernels on CPU tensors
            t0 = time.perf_counter()
            record: dict = {"budget_s": round(timeout, 1)}
            try:
                with open(log_path, "a") as log:
                    rc = run(cmd, timeout + 5, log, env)
                outcome = json.loads(child_out.read_text()) if child_out.exists() else None
                if outcome is None:
                    record.update(status="failed", error=f"the section's process exited with {rc} and no result")
                else:
                    record.update(
                        status="passed" if outcome["passed"] else "failed",
                        result=outcome["result"],
                        error=outcome["error"],
                    )
            except TimeoutError as e:
                record.update(status="failed", error=f"timed out: {e}")
            record["seconds"] = round(time.perf_counter() - t0, 1)
            if record["status"] != "passed":
                tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                record["log_tail"] = tail
            report["sections"][name] = record
            print(
                f"  {name:<13} {record['status']:<7} {record['seconds']:>6.1f} s  {summary(name, record)}", flush=True
            )
        if prebuild is not None and prebuild.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(prebuild.pid, signal.SIGKILL)
            prebuild.wait()
    report["seconds"] = round(time.time() - started, 1)
    report["passed"] = all(r["status"] == "passed" for r in report["sections"].values())
    partial = json_path.with_name(json_path.name + ".tmp")
    partial.write_text(json.dumps(report, indent=1, default=str) + "\n")
    partial.replace(json_path)
    failed = [n for n, r in report["sections"].items() if r["status"] != "passed"]
    print(f"{'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']:.0f} s -> {json_path}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
