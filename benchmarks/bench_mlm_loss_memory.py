"""Peak memory of the masked-LM loss, forward and backward: ``fastbert.ops.mlm_loss`` against the naive
full-logits cross-entropy.

Shape: M = 4096 masked rows, V = 30522 (BERT's vocabulary), H = 768. On CPU (float32) fastbert's path is the torch
reference in fastbert/ops.py (row blocks of at most 8M logits); with a GPU two more rows run in bf16 on CUDA, where
fastbert's path is the Triton kernel. Each provider runs in its own process; the figure is the growth of the peak
resident set (VmHWM, reset through /proc/self/clear_refs once the inputs exist) or, on CUDA, of torch's peak
allocated memory during one forward and backward, so it counts every temporary plus the gradients themselves
(``d_weight`` alone is V x H x 4 bytes = 94 MB in float32, for every provider). Goal: fastbert at most 1/8 of
the naive peak. Linux only. The JSON goes to benchmarks/results/mlm_loss_memory_cpu.json.

    python benchmarks/bench_mlm_loss_memory.py [--rows 4096 --vocab 30522 --hidden 768]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "mlm_loss_memory_cpu.json"
PROVIDERS = ("naive", "fastbert")  # on CPU; with CUDA also "naive-cuda" and "fastbert-cuda" (the Triton kernel)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(provider: str, rows: int, vocab: int, hidden: int) -> dict:
    """Runs in the child process: one forward and backward of ``provider``; peak growth in MiB and seconds."""
    import gc

    import torch
    import torch.nn.functional as F

    from fastbert import ops
    from fastbert.config import IGNORE_INDEX

    cuda = provider.endswith("-cuda")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_()
    b = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device=device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if provider.startswith("naive"):
        loss = F.cross_entropy(F.linear(h, w, b).float(), labels, ignore_index=IGNORE_INDEX)
    else:
        loss, _ = ops.mlm_loss(h, w, b, labels)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {
        "provider": provider,
        "dtype": str(dtype).removeprefix("torch."),
        "peak_mib": round((peak - before) / 2**20, 1),
        "seconds": round(seconds, 2),
        "loss": round(loss.item(), 5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.vocab, args.hidden)))
        return 0

    import torch

    shape = ["--rows", str(args.rows), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    providers = PROVIDERS + (("naive-cuda", "fastbert-cuda") if torch.cuda.is_available() else ())
    results = []
    for provider in providers:
        done = subprocess.run(
            [sys.executable, __file__, "--child", provider, *shape], check=True, capture_output=True, text=True
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    naive = results[0]["peak_mib"]
    logits_mib = args.rows * args.vocab * 4 / 2**20
    print(
        f"MLM loss fwd+bwd, M={args.rows} V={args.vocab} H={args.hidden} float32 on CPU "
        f"({platform.processor() or platform.machine()}); one [M, V] fp32 tensor = {logits_mib:.0f} MiB"
    )
    print(f"{'provider':<14} {'dtype':<9} {'peak MiB':>9} {'vs naive':>9} {'seconds':>8} {'loss':>9}")
    for r in results:
        base = naive if not r["provider"].endswith("-cuda") else results[2]["peak_mib"]
        print(
            f"{r['provider']:<14} {r['dtype']:<9} {r['peak_mib']:>9.1f} {r['peak_mib'] / base:>9.3f} "
            f"{r['seconds']:>8.2f} {r['loss']:>9.5f}"
        )
    ratio = results[1]["peak_mib"] / naive
    print(f"goal: fastbert <= 1/8 of naive ({naive / 8:.1f} MiB): {'met' if ratio <= 1 / 8 else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "rows": args.rows,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": "float32",
        "machine": platform.machine(),
        "results": results,
        "ratio": round(ratio, 4),
        "goal_met": ratio <= 1 / 8,
    }
    partial = RESULTS.with_name(RESULTS.name + ".tmp")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    partial.replace(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
