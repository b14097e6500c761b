"""``fastbert pretrain``: BERT pretraining over DeepSpeed with LAMB, exact resume and checkpoints.

One code path for a plain process, ``torchrun`` and the ``deepspeed`` launcher: the distributed environment comes
from the launcher's variables (a plain process makes a world of one on a free loopback port). Everything that can be
wrong with the arguments (batch sizes that do not divide, a data directory for another vocabulary, a config that
does not match the checkpoint being resumed, ZeRO-3) is reported before the first step.

Each optimizer step takes the same global batch whatever the world size (``MicroBatchPlan``); the learning rate
follows warmup + polynomial decay by optimizer step; a step whose gradients are not finite is skipped and logged.
Rank 0 writes ``metrics.jsonl`` (one object per optimizer step), TensorBoard events and a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fastbert.atomic import write_atomic
from fastbert.config import PRESETS, BertConfig
from fastbert.data.masking import MaskingCollator
from fastbert.data.sampler import MicroBatchDataset, MicroBatchPlan
from fastbert.data.shards import ShardDataset, vocab_sha256
from fastbert.model import BertForPreTraining
from fastbert.optim import Lamb, parameter_groups, warmup_poly_lr
from fastbert.optim.lamb import LambSetupError
from fastbert.options import option
from fastbert.train import checkpoint
from fastbert.train.distributed import init_distributed, pin, quiet_deepspeed, set_tf32
from fastbert.train.evaluation import evaluate, held_out_batches
from fastbert.train.flops import peak_flops, training_flops
from fastbert.train.step import SUMS, optimizer_step, step_metrics

log = logging.getLogger("fastbert.train")


PRECISIONS = ("fp32", "bf16", "fp16")


class TrainingDivergedError(RuntimeError):
    """Training stopped: too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


class TrainingSetupError(ValueError):
    """Arguments, data or checkpoints that cannot make a training run; raised before the first step."""


@dataclass
class PretrainArgs:
    data: str = option(help="directory written by prepare-data")
    out: str = option(help="run directory (checkpoints, metrics, TensorBoard)")
    model: str = option("tiny", help=f"preset ({', '.join(PRESETS)}) or a config.json")
    seq_len: int | None = option(None, help="longest sequence (default: the data's sequence length)")
    global_batch: int = option(32, help="sequences per optimizer step, over all ranks")
    micro_batch: int = option(8, help="sequences per forward pass on one rank (accumulation makes up the rest)")
    steps: int = option(1000, help="optimizer steps")
    lr: float = option(1e-3, help="peak learning rate")
    warmup: float = option(100, help="warmup: a number of steps, or a fraction of --steps when below 1 (0.01: 1%%)")
    decay_power: float = option(1.0, help="power of the polynomial decay after warmup (0.5 or 1)")
    weight_decay: float = option(0.01, help="LAMB weight decay (not on biases and LayerNorm)")
    max_trust_ratio: float = option(10.0, help="cap on LAMB's per-parameter trust ratio")
    grad_clip: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    zero_stage: int = option(
        0, help="DeepSpeed ZeRO stage (3 is refused: LAMB needs whole parameters)", choices=(0, 1, 2, 3)
    )
    precision: str = option(
        "fp32", help="fp32, bf16 (mixed, fp32 master weights) or fp16 (GPU only)", choices=PRECISIONS
    )
    deepspeed: str | None = option(None, help="extra DeepSpeed config JSON merged into fastbert's")
    resume: str | None = option(None, help="'auto' (the latest checkpoint of --out, if any) or a checkpoint path")
    init_from: str | None = option(None, help="start from this checkpoint's weights (e.g. for phase 2)")
    reset_optimizer: bool = option(False, help="with --init-from: fresh optimizer state")
    save_every: int = option(0, help="checkpoint every N steps (and always at the end; 0: only at the end)")
    keep: int = option(3, help="checkpoints to keep")
    dropout: float | None = option(None, help="override the model's hidden and attention dropout")
    seed: int = option(0, help="seed of initialisation, data order and masking")
    loader_workers: int = option(0, help="data loader processes (0: in the training process)")
    whole_word: bool = option(False, help="mask whole words: a word's ## continuation pieces (from the vocab) with it")
    dist_timeout: float = option(120.0, help="seconds a collective may wait for another rank before the run fails")
    max_skipped_steps: int = option(10, help="stop with an error after this many non-finite steps in a row (0: never)")
    tf32: bool = option(True, help="on GPUs: fp32 matmuls and attention on TF32 tensor cores (Ampere and newer)")
    eval_data: str | None = option(
        None, help="held-out data (a prepare-data directory, same vocabulary): its MLM loss and accuracy are logged"
    )
    eval_every: int = option(0, help="with --eval-data: evaluate every N steps (0: at the end only)")
    eval_samples: int = option(2000, help="with --eval-data: score at most this many of its samples (fixed masks)")
    max_minutes: float | None = option(
        None, help="stop at the first step boundary after this many minutes, saving a checkpoint (resume it later)"
    )
    overwrite: bool = option(
        False, help="start over in an --out that holds another run (its checkpoints, metrics and logs are deleted)"
    )
    progress: bool = option(True, help="show a progress bar")


def _model_config(args: PretrainArgs, vocab_size: int, objective: str, seq_len: int) -> BertConfig:
    if args.model in PRESETS:
        config = BertConfig.preset(args.model, vocab_size=vocab_size)
    else:
        config = BertConfig.from_json_file(args.model)
        if config.vocab_size != vocab_size:
            raise TrainingSetupError(
                f"{args.model}: vocab_size {config.vocab_size} but the data's vocabulary has {vocab_size} tokens"
            )
    changes = {"sentence_objective": objective, "max_position_embeddings": max(config.max_position_embeddings, seq_len)}
    if args.dropout is not None:
        changes.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    return config.replace(**changes)


def _zero_partitions(args: PretrainArgs) -> bool:
    """Whether DeepSpeed hands LAMB flat partitions for this run (ZeRO-1/2); checked against what it built."""
    return args.zero_stage in (1, 2)


def _deepspeed_clipping(args: PretrainArgs) -> float:
    """DeepSpeed's ``gradient_clipping``: under ZeRO-1/2 only its wrapper sees the whole gradient, so it clips;
    otherwise LAMB clips (with an exact norm) and DeepSpeed's own clipping stays off. Checked against what
    DeepSpeed built in ``pretrain``."""
    return args.grad_clip if _zero_partitions(args) else 0.0


def _ds_config(args: PretrainArgs) -> dict:
    config: dict = {}
    if args.deepspeed:
        config = json.loads(Path(args.deepspeed).read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in config:
                raise TrainingSetupError(f"{args.deepspeed}: {key} comes from --global-batch/--micro-batch; remove it")
        if config.get("optimizer") or config.get("scheduler"):
            raise TrainingSetupError(
                f"{args.deepspeed}: the optimizer and schedule are fastbert's LAMB; remove 'optimizer'/'scheduler'"
            )
    if args.zero_stage == 3 or config.get("zero_optimization", {}).get("stage") == 3:
        raise TrainingSetupError(
            "ZeRO-3 is not supported with LAMB: ZeRO-3 partitions parameters so that LAMB's "
            "per-parameter trust ratio cannot be formed from the local partition; use "
            "--zero-stage 1 or 2 (they give the same update as no ZeRO)"
        )
    if args.precision not in PRECISIONS:
        raise TrainingSetupError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise TrainingSetupError("fp16 needs a GPU (DeepSpeed refuses it on CPU); use --precision bf16 or fp32")
    config.update(
        train_batch_size=args.global_batch,
        train_micro_batch_size_per_gpu=args.micro_batch,
        gradient_clipping=_deepspeed_clipping(args),
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
    )
    config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif args.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


INTERRUPTED_EXIT = 130  # the exit status of a run stopped by a signal (after saving a checkpoint)


class _StopRequest:
    """Turns the first SIGTERM/SIGINT into a flag checked between optimizer steps (the run saves and stops); a
    second one stops at once, without saving."""

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.signal: str | None = None
        self.announce = announce
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second one: give up now
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopped without saving")
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.announce:
            print(
                f"\nfastbert pretrain: {self.signal}: saving a checkpoint when this step ends, then stopping "
                "(send it again to stop at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def masking_collator(args: PretrainArgs, dataset: ShardDataset, vocab_tokens: list[str]) -> MaskingCollator:
    """The run's masking: BERT's 15% with 80/10/10, whole words (a word's ``##`` pieces with it) when asked by
    ``--whole-word`` or by the shards' meta.json (``prepare-data --whole-word``)."""
    whole_word = args.whole_word or bool(dataset.meta.get("whole_word", False))
    continuation_ids = [i for i, token in enumerate(vocab_tokens) if token.startswith("##")] if whole_word else []
    return MaskingCollator(
        len(vocab_tokens),
        list(dataset.special_ids.values()),
        dataset.special_ids["mask"],
        seed=args.seed,
        pad_id=dataset.special_ids["pad"],
        whole_word=whole_word,
        continuation_ids=continuation_ids,
    )


def _loader_worker_init(worker_id: int) -> None:
    """A data-loader worker ignores SIGTERM and SIGINT. A signal sent to the launcher's whole process group (a job
    scheduler's SIGTERM, Ctrl-C) reaches the workers too; left to the default they die, and PyTorch's SIGCHLD
    handler then raises in the rank wherever it is, so the rank crashes instead of saving a checkpoint. The rank
    stops them when it is done; if the rank itself dies, they notice and exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_vocab(data_dir: Path) -> tuple[list[str], bytes, bytes]:
    vocab_path = data_dir / "vocab.txt"
    if not vocab_path.exists():
        raise TrainingSetupError(f"{data_dir}: no vocab.txt (prepare-data writes one beside the shards)")
    from fastbert import _wordpiece

    vocab = _wordpiece.Vocab.from_file(str(vocab_path))
    config_path = data_dir / "tokenizer_config.json"
    return vocab.tokens, vocab_path.read_bytes(), config_path.read_bytes() if config_path.exists() else b"{}\n"


def _holds_a_run(run_dir: Path) -> str:
    """What in ``run_dir`` shows a previous run (its checkpoints, logged steps), or "" when nothing does."""
    saved = sorted(p.name for p in (run_dir / checkpoint.CHECKPOINTS).glob("step-*"))
    if saved:
        return f"{len(saved)} checkpoint(s), the last {saved[-1]}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return f"{metrics} has logged steps"
    return ""


def warmup_steps(warmup: float, steps: int) -> int:
    """--warmup as a number of steps: a value below 1 is a fraction of the run's steps."""
    if warmup < 0:
        raise TrainingSetupError(f"--warmup {warmup} is negative")
    if warmup < 1:
        return round(warmup * steps)
    if warmup != int(warmup):
        raise TrainingSetupError(f"--warmup {warmup}: a whole number of steps, or a fraction below 1")
    return int(warmup)


def pretrain(args: PretrainArgs) -> dict:
    """Run (or resume) pretraining; returns the final metrics of rank 0, with ``stopped`` set to the signal's name
    or ``"max-minutes"`` when the run stopped (and saved) before ``args.steps``."""
    quiet_deepspeed()
    import deepspeed

    started = time.perf_counter()
    warmup = warmup_steps(args.warmup, args.steps)
    if args.model not in PRESETS and not os.path.isfile(args.model):  # before the slow distributed start-up
        raise TrainingSetupError(
            f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file"
        )
    init_distributed(args.dist_timeout)
    set_tf32(args.tf32)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir, data_dir = Path(args.out), Path(args.data)

    # Everything that can be wrong is checked before the first step.
    plan_args = dict(
        global_batch=args.global_batch, micro_batch=args.micro_batch, seed=args.seed, rank=rank, world_size=world
    )
    if args.global_batch % (args.micro_batch * world):
        raise TrainingSetupError(
            f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch} x world size "
            f"{world} = {args.micro_batch * world}"
        )
    vocab_tokens, vocab_bytes, tokenizer_config = _read_vocab(data_dir)
    dataset = ShardDataset(data_dir, vocab_tokens=vocab_tokens)
    seq_len = args.seq_len or dataset.seq_len
    if dataset.seq_len > seq_len:
        raise TrainingSetupError(f"{data_dir}: samples are up to {dataset.seq_len} tokens but --seq-len is {seq_len}")
    objective = dataset.meta["objective"]
    eval_dataset = None
    if args.eval_data:
        eval_dataset = ShardDataset(args.eval_data, vocab_tokens=vocab_tokens, verify="full")
        if eval_dataset.meta["objective"] != objective:
            raise TrainingSetupError(
                f"--eval-data {args.eval_data}: prepared for objective {eval_dataset.meta['objective']!r}, "
                f"but {data_dir} for {objective!r}"
            )
        if eval_dataset.seq_len > (args.seq_len or dataset.seq_len):
            raise TrainingSetupError(
                f"--eval-data {args.eval_data}: samples are up to {eval_dataset.seq_len} tokens, longer than the "
                "run's sequence length"
            )
    resume_from = None
    if args.resume == "auto":
        # Fresh only when the run holds no checkpoint at all: a dangling `latest` or a broken checkpoint is an error,
        # never a silent restart that would overwrite the run's metrics and checkpoints.
        saved = run_dir / checkpoint.CHECKPOINTS
        if saved.is_dir() and any(saved.iterdir()):
            try:
                resume_from = checkpoint.resolve(run_dir)
            except checkpoint.CheckpointNotFound as e:
                raise TrainingSetupError(f"--resume auto: {e}; pick a checkpoint with --resume PATH") from e
    elif args.resume:
        resume_from = checkpoint.resolve(args.resume)
    previous_run = resume_from is None and _holds_a_run(run_dir)
    if previous_run and not args.overwrite:
        raise TrainingSetupError(
            f"--out {run_dir} already holds a run ({previous_run}); continue it with --resume auto, start over with "
            "--overwrite (which deletes it), or choose another --out"
        )
    config = _model_config(args, len(vocab_tokens), objective, seq_len)
    source = resume_from or (checkpoint.resolve(args.init_from) if args.init_from else None)
    if source is not None:
        saved = BertConfig.from_json_file(source / "config.json")
        diff = {
            k: (v, getattr(config, k))
            for k, v in asdict(saved).items()
            if getattr(config, k) != v and k != "max_position_embeddings"
        }
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
            raise TrainingSetupError(f"{source}: the model config does not match this run ({detail})")
        saved_vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
        if vocab_sha256(saved_vocab) != vocab_sha256(vocab_tokens):
            raise TrainingSetupError(f"{data_dir}: the data's vocabulary differs from the one of checkpoint {source}")
        config = saved.replace(max_position_embeddings=max(saved.max_position_embeddings, seq_len))
    ds_config = _ds_config(args)
    plan = MicroBatchPlan(num_samples=len(dataset), **plan_args)

    torch.manual_seed(args.seed)
    model = BertForPreTraining(config)
    optimizer = Lamb(
        parameter_groups(model, args.weight_decay),
        lr=args.lr,
        max_grad_norm=args.grad_clip if args.grad_clip > 0 else None,
        max_trust_ratio=args.max_trust_ratio,
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    try:
        optimizer.attach_to_engine(engine, list(model.parameters()))
    except LambSetupError as e:
        raise TrainingSetupError(str(e)) from e
    if optimizer.partitioned != _zero_partitions(args):
        raise TrainingSetupError(
            f"DeepSpeed built {type(engine.optimizer).__name__} for --zero-stage "
            f"{args.zero_stage}, which fastbert has not been tested with (gradient clipping "
            "would be applied twice or not at all)"
        )

    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        start_step = int(state["step"])
        start_position = plan.check_state(state["data"])
        log.info("resumed from %s at step %d", resume_from, start_step)
    else:
        if args.init_from:
            checkpoint.load(engine, checkpoint.resolve(args.init_from), load_optimizer=not args.reset_optimizer)
        start_position = 0
    if start_position != start_step * plan.accumulation:
        raise TrainingSetupError(f"checkpoint position {start_position} is not at step {start_step}'s boundary")

    collate = masking_collator(args, dataset, vocab_tokens)
    eval_batches = None
    if eval_dataset is not None:
        eval_batches = held_out_batches(
            eval_dataset,
            masking_collator(args, eval_dataset, vocab_tokens),
            args.micro_batch,
            rank,
            world,
            args.eval_samples,
        )
        if engine.device.type == "cuda":
            eval_batches = [pin(b) for b in eval_batches]
    loader = torch.utils.data.DataLoader(
        MicroBatchDataset(dataset, plan, collate),
        batch_size=None,
        num_workers=args.loader_workers,
        sampler=range(start_position, args.steps * plan.accumulation),
        persistent_workers=False,
        pin_memory=engine.device.type == "cuda",
        worker_init_fn=_loader_worker_init if args.loader_workers else None,
    )

    files = {
        "config.json": config.to_json_string("BertForPreTraining").encode(),
        "vocab.txt": vocab_bytes,
        "tokenizer_config.json": tokenizer_config,
    }
    metrics_path = run_dir / "metrics.jsonl"
    writer = None
    bar = None
    time_offset = 0.0  # seconds the run had trained before this process (on resume)
    if rank == 0:
        if previous_run:  # --overwrite, and every input checked: the old run goes now
            log.warning("--overwrite: deleting the run in %s (%s)", run_dir, previous_run)
            shutil.rmtree(run_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(run_dir / name, data)
        write_atomic(run_dir / "args.json", (json.dumps(asdict(args), indent=2) + "\n").encode())
        kept = []
        if metrics_path.exists():  # on resume, the steps after the checkpoint will be logged again
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
        write_atomic(metrics_path, "".join(line + "\n" for line in kept).encode())
        if kept:  # the run's clock goes on from where the kept rows left it
            time_offset = json.loads(kept[-1]).get("time", 0.0)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            log.warning("tensorboard is not installed; writing metrics.jsonl only")
        if args.progress:
            from tqdm import tqdm

            bar = tqdm(total=args.steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)

    peak = peak_flops(engine.device, args.precision, tf32=args.tf32)
    if peak is None and engine.device.type == "cuda" and rank == 0:
        log.warning(
            "%s: peak FLOP/s unknown, so model-FLOPs utilisation is not logged",
            torch.cuda.get_device_name(engine.device),
        )
    stop = _StopRequest(announce=rank == 0)
    last: dict = {}
    step = start_step
    skipped_in_a_row = 0
    batches = iter(loader)
    if resume_from is not None:
        checkpoint.restore_rng(resume_from)
    budget = None if args.max_minutes is None else args.max_minutes * 60
    cleanup = contextlib.ExitStack()
    if bar is not None:  # log lines go above the bar instead of through it
        from tqdm.contrib.logging import logging_redirect_tqdm

        cleanup.enter_context(logging_redirect_tqdm())
    tick = time.perf_counter()
    try:
        while step < args.steps:
            lr = warmup_poly_lr(step, args.lr, warmup, args.steps, args.decay_power)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [next(batches) for _ in range(plan.accumulation)]
            sums = optimizer_step(
                engine,
                micro_batches,
                world,
                skipped=lambda: optimizer.last_step_skipped or not engine.was_step_applied(),
                stop=stop.requested,
                out_of_time=lambda: budget is not None and time.perf_counter() - started >= budget,
            )
            values = dict(zip(SUMS, sums.tolist(), strict=True))  # the step's one read back to the host
            step += 1
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            grad_norm = engine.get_global_grad_norm() if optimizer.partitioned else optimizer.grad_norm
            skipped = values["skipped"] > 0
            last = {
                "step": step,
                **step_metrics(values, objective != "none"),
                "lr": lr,
                "grad_norm": None if skipped or grad_norm is None else float(grad_norm),
                "skipped": skipped,
                "tokens_per_s": values["tokens"] / elapsed,
                "samples_per_s": values["sequences"] / elapsed,
                "time": time_offset + (tick - started),  # seconds since the run started, resumes included
                "wall": time.time(),
            }
            if engine.device.type == "cuda":
                last["max_memory_gb"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
            if args.precision == "fp16":
                last["loss_scale"] = float(engine.optimizer.loss_scale)
            if peak is not None:
                model_flops = training_flops(
                    config,
                    tokens=int(values["tokens"]),
                    squared_lengths=int(values["squared_lengths"]),
                    sequences=int(values["sequences"]),
                    masked=int(values["masked"]),
                )
                last["mfu"] = model_flops / elapsed / (peak * world)
            if eval_batches is not None and (
                step == args.steps
                or values["stop"] > 0
                or values["out_of_time"] > 0
                or (args.eval_every and step % args.eval_every == 0)
            ):
                last.update(evaluate(engine.module, eval_batches, engine.device))
                tick = time.perf_counter()  # the evaluation is not the next step's time
            skipped_in_a_row = skipped_in_a_row + 1 if last["skipped"] else 0
            if last["skipped"]:
                log.warning(
                    "step %d skipped: non-finite loss or gradient (weights and optimizer state unchanged)", step
                )
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if writer is not None:
                    for key, value in last.items():
                        if key != "step" and value is not None:
                            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                            writer.add_scalar(tag, float(value), step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        mlm=f"{last['mlm_accuracy']:.3f}",
                        seq_s=f"{last['samples_per_s']:.1f}",
                    )
            if args.max_skipped_steps and skipped_in_a_row >= args.max_skipped_steps:
                raise TrainingDivergedError(
                    f"{skipped_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient, so "
                    f"nothing was learnt; stopping without saving (the weights are those of the last checkpoint, if "
                    f"any; --max-skipped-steps 0 never stops)"
                )
            stopping = values["stop"] > 0 or values["out_of_time"] > 0
            if step == args.steps or stopping or (args.save_every and step % args.save_every == 0):
                client_state = {"step": step, "data": plan.state_dict(step * plan.accumulation), "args": asdict(args)}
                path = checkpoint.save(engine, run_dir, step, client_state, files, args.keep)
                if rank == 0:
                    log.info("saved %s", path)
            if stopping and step < args.steps:
                # A signal on any rank wins over the time budget; ranks agree through the step's sums.
                by = "max-minutes" if values["stop"] == 0 else stop.signal or "a signal on another rank"
                last = {**last, "stopped": by}
                break
    finally:
        stop.restore()
        cleanup.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last
