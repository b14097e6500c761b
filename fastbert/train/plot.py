"""``fastbert plot RUN_DIR``: the training curves of a run (loss, held-out loss when evaluated, accuracies, learning
rate) as one PNG."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from fastbert.atomic import write_atomic


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a fastbert run directory?)")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
    return rows


# The accuracy series a run's rows may carry (an MLM run the first and maybe the second, ELECTRA the last two).
ACCURACIES = {
    "mlm_accuracy": "MLM",
    "sentence_accuracy": "NSP/SOP",
    "generator_accuracy": "generator (MLM)",
    "discriminator_accuracy": "discriminator (replaced token)",
}


def plot(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] for r in rows], label="training")
    held_out = [(r["step"], r["eval_mlm_loss"]) for r in rows if "eval_mlm_loss" in r]
    if held_out:
        axes[0].plot([s for s, _ in held_out], [v for _, v in held_out], "o-", label="held-out MLM")
        axes[0].legend()
    axes[0].set(title="loss", xlabel="step")
    for key, label in ACCURACIES.items():
        if key in rows[0]:
            axes[1].plot(steps, [r[key] for r in rows], label=label)
    axes[1].set(title="accuracy", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["lr"] for r in rows])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buffer.getvalue())
    return out
