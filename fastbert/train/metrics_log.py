"""Where a run's per-step metrics go: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard events
and the progress bar, written by rank 0 only.

On resume the rows after the checkpoint's step are dropped (those steps run again and are logged again), and the
run's clock (``time``, seconds since the run started) goes on from the last kept row. Log lines go above the
progress bar instead of through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from fastbert.atomic import write_atomic

log = logging.getLogger("fastbert.train")


class MetricsLog:
    def __init__(
        self,
        run_dir: Path,
        *,
        start_step: int,
        total_steps: int,
        enabled: bool,
        progress: bool,
        budget: float | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.budget = budget  # a --budget run's bar counts its seconds (the rows' "clock"), not steps
        self.enabled = enabled
        self.time_offset = 0.0  # seconds the run had trained before this process (on resume)
        self.writer = self.bar = None
        self._cleanup = contextlib.ExitStack()
        if not enabled:
            return
        kept = []
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
        write_atomic(self.path, "".join(line + "\n" for line in kept).encode())
        if kept:
            self.time_offset = json.loads(kept[-1]).get("time", 0.0)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed; writing metrics.jsonl only")
        if progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            if budget is None:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)
            else:
                self.bar = tqdm(
                    total=round(budget),
                    desc="pretrain",
                    unit="s",
                    dynamic_ncols=True,
                    # tqdm puts ", " before a set postfix
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the budget{postfix}",
                )
            self._cleanup.enter_context(logging_redirect_tqdm())

    def write(self, row: dict) -> None:
        """One optimizer step's row: appended to metrics.jsonl, each number to TensorBoard (held-out metrics under
        ``eval/``, the rest under ``train/``), and the bar advanced."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, float(value), row["step"])
        if self.bar is not None:
            if self.budget is None:
                self.bar.update(1)
            else:
                self.bar.update(max(0.0, min(row["clock"], self.budget) - self.bar.n))
            if "mlm_accuracy" in row:
                accuracy = {"mlm": f"{row['mlm_accuracy']:.3f}"}
            else:  # ELECTRA: the generator's and the discriminator's
                accuracy = {"gen": f"{row['generator_accuracy']:.3f}", "disc": f"{row['discriminator_accuracy']:.3f}"}
            # In this order (keyword arguments alone would be sorted by name).
            self.bar.set_postfix(
                {"step": row["step"], "loss": f"{row['loss']:.3f}", **accuracy, "seq_s": f"{row['samples_per_s']:.1f}"}
            )

    def close(self) -> None:
        self._cleanup.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
