"""Rows measured beside a time-to-quality run (benchmarks/bench_time_to_quality.py), one at a time, with the
benchmark's own functions, corpus, held-out masks and downstream suite (full size), so that a question a finished
run raised is answered without running every system again. Each writes one JSON.

    python benchmarks/ttq_extra_rows.py deberta-floor     # a randomly initialised deberta-tiny, fine-tuned and probed
    python benchmarks/ttq_extra_rows.py electra-deberta   # ELECTRA on deberta-tiny (1-layer generator), 10 minutes

Both rows are now in the benchmark's default run: ``deberta-floor`` is its ``random_init`` (``random_deberta``),
the floor the recipe's downstream gains are measured from; ``electra-deberta`` is its ELECTRA row (``ELECTRA_FLAGS``:
DeBERTa-v3's replaced-token detection with gradient-disentangled embedding sharing, a one-layer generator): its
generator's held-out loss, its discriminator's training curve and held-out ROC AUC, and the downstream suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_time_to_quality as ttq  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ELECTRA_DEBERTA_FLAGS = ttq.ELECTRA_FLAGS  # the benchmark now runs these by default


def held_out_masks():
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(ttq.vocab_path()), lowercase=True)
    return ttq.held_out_masks(tok, [c for c in ttq.kjv_chapters() if c[0] in ttq.HELD_OUT_BOOKS])


def downstream(entry: dict, directory: Path, vocab_size: int) -> None:
    suite = ttq.downstream_suite(ttq.kjv_chapters(), quick=False)
    suite.encode(ttq.vocab_path())
    entry["linear_probe"] = suite.probed(directory, vocab_size)
    print("linear probe: " + ", ".join(f"{t} {r['test']:.3f}" for t, r in entry["linear_probe"].items()), flush=True)
    entry["finetuned"] = suite.finetuned(directory, vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=("deberta-floor", "electra-deberta"))
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="electra-deberta's budget")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or RESULTS / f"time_to_quality_{args.row.replace('-', '_')}.json"
    started = time.time()
    vocab_size = len(ttq.vocab_path().read_text(encoding="utf-8").splitlines())
    work = Path(tempfile.mkdtemp(prefix=f"ttq-{args.row}-"))
    if args.row == "deberta-floor":
        entry = {"system": "random init deberta-tiny (floor)"}
        downstream(entry, ttq.random_deberta(work / "random-deberta", vocab_size), vocab_size)
    else:
        masks = held_out_masks()
        corpus = work / "kjv-train.txt"
        ttq.write_corpus(corpus, [c for c in ttq.kjv_chapters() if c[0] not in ttq.HELD_OUT_BOOKS])
        system = ttq.FastbertSystem("fastbert ELECTRA (deberta-tiny)", "electra", ELECTRA_DEBERTA_FLAGS, "electra")
        budget_s = args.budget_minutes * 60
        # No calibration: without checkpoints the pace only sizes a plan that --budget overrides.
        r = system.run(corpus, work, budget_s, ttq.Pace(step_s=2.5, overhead_s=5.0), 0)
        from fastbert.train.export import export

        final = export(r["run"], work / "export")
        entry = {
            "system": system.name,
            "flags": ELECTRA_DEBERTA_FLAGS,
            "budget_s": budget_s,
            **{k: r[k] for k in ("steps", "time_s", "prepare_s")},
            "final_held_out_loss": ttq.held_out_loss(ttq.load_masked_lm(final / "generator"), masks),
            "discriminator": ttq.discriminator_summary(r["metrics"], r["start"]),
            "held_out_discriminator": ttq.held_out_discriminator(final, masks),
        }
        held = entry["held_out_discriminator"]
        print(
            f"{r['steps']} steps; generator held-out loss {entry['final_held_out_loss']:.3f}; discriminator ROC AUC "
            f"{held['roc_auc']:.3f}, recall {held['recall']:.3f}",
            flush=True,
        )
        downstream(entry, final, vocab_size)
    entry["total_s"] = time.time() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
