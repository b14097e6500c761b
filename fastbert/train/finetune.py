"""``fastbert finetune``: the seeds' recipe (a task head on a pretrained encoder, the whole model trained, AdamW,
warmup then linear decay) for classification, sentence pairs, regression, NER and extractive QA.

The model comes from an HF directory, a fastbert run directory or a checkpoint (exported on the fly). Each epoch is
evaluated; the best model (by the task's main metric) is kept in ``OUT/best`` with its tokenizer, every epoch's
metrics go to ``OUT/metrics.jsonl`` and the best ones to ``OUT/eval_results.json``; ``--predict FILE`` writes
``OUT/predictions.jsonl``. Training runs on CUDA with bf16 autocast when a GPU is there, on CPU otherwise.

The same job runs in one plain process (the fastest on one device) or over DeepSpeed: under ``torchrun`` or the
``deepspeed`` launcher, or when ``--deepspeed CONFIG`` or ``--zero-stage`` is given. Then every rank trains on its
share of each global batch with the same result as one process (the losses are weighted so), evaluation is split
across ranks, and the best model is saved from the fp32 master weights.

A run can be resumed exactly. At the end of every epoch, and at the step boundary after a first SIGINT/SIGTERM, the
whole training state (fp32 weights, optimizer state, the step, the position in the epoch, every RNG state, the
best score and metrics so far, the labels and the arguments) replaces ``OUT/state`` atomically; ``--resume auto``
continues from it with the same metrics and the same final weights as a run that was never stopped. A stopped run
raises :class:`FinetuneInterrupted` (a ``KeyboardInterrupt``: the CLI exits 130); a finished run removes its state.

What is particular to a task (its file format, features, head, decoding, metrics) belongs to its ``Task`` in
``fastbert.tasks``; this module is the loop around any of them, and knows no task by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastbert.atomic import replace_directory, write_atomic
from fastbert.model import Layout
from fastbert.optim import parameter_groups, warmup_poly_lr
from fastbert.options import option
from fastbert.tasks import TASKS, Task
from fastbert.train import checkpoint
from fastbert.train.distributed import default_device, pin, set_tf32, to_device
from fastbert.train.stopping import StopRequest

log = logging.getLogger("fastbert.finetune")
STATE = "state"  # OUT/state: the resumable training state, replaced atomically (see _save_state)
STATE_NEW = ".state-new"  # where the next state is written before it is renamed into place
STATE_OLD = ".state-old"  # the previous state during the swap (the state, should a crash fall between two renames)
TRAINER_STATE = "trainer_state.json"  # the position, best score, metrics rows, labels, arguments (plain data)
PLAIN_STATE = "model_optimizer.pt"  # the plain engine's weights and optimizer state (DeepSpeed writes its own files)
# What a run writes in --out (any of them marks --out as holding a run):
RUN_FILES = ("eval_results.json", "metrics.jsonl", "predictions.jsonl", "best", "init", STATE, STATE_OLD)
# Arguments that may differ between a run and its resumption: they change nothing that is computed.
RESUME_FREE = ("resume", "overwrite", "progress", "dist_timeout")


@dataclass
class FinetuneArgs:
    task: str = option(help="the task head and metric", choices=TASKS)
    model: str = option(help="HF model directory, fastbert run directory or checkpoint")
    train: str = option(help=".tsv/.csv/.jsonl table, CoNLL file or SQuAD JSON (README: the columns per task)")
    out: str = option(help="output directory (best/, metrics.jsonl, eval_results.json, predictions.jsonl)")
    eval: str | None = option(None, help="evaluated after every epoch; the best epoch's model is kept")
    predict: str | None = option(None, help="write predictions for this file to OUT/predictions.jsonl")
    max_length: int = option(128, help="tokens per example (window size for QA)")
    epochs: int = option(3, help="passes over the training set")
    lr: float | None = option(
        None, help="peak learning rate; default by model width: 3e-5 at hidden 768+, 1e-4 up to 512, 5e-4 up to 256"
    )
    batch_size: int = option(32, help="examples per optimizer step (over all ranks)")
    warmup_ratio: float = option(0.1, help="share of the steps spent warming up, then linear decay")
    weight_decay: float = option(0.01, help="AdamW weight decay (not on biases and LayerNorm)")
    seed: int = option(0, help="seed of the head's initialisation, dropout and data order")
    text_column: str = option("text", help="table column of the text")
    pair_column: str | None = option(None, help="second text of a pair (default for --task pair: text_b)")
    label_column: str = option("label", help="table column of the label")
    skip_bad_rows: bool = option(False, help="count and skip malformed rows instead of failing")
    doc_stride: int = option(128, help="QA: overlap step of context windows")
    max_answer_length: int = option(30, help="QA: longest answer in tokens")
    null_threshold: float | None = option(None, help="QA (SQuAD v2): no-answer threshold")
    dropout: float | None = option(None, help="override hidden and attention dropout")
    precision: str = option("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    deepspeed: str | None = option(
        None,
        help="train in a DeepSpeed engine with this config (ZeRO, ...; batch, optimizer and schedule stay "
        "fastbert's); implied under torchrun or the deepspeed launcher",
        metavar="DS_CONFIG",
    )
    zero_stage: int | None = option(None, help="DeepSpeed ZeRO stage", choices=(0, 1, 2))
    dist_timeout: float = option(300.0, help="seconds a collective may wait for another rank before the run fails")
    tf32: bool = option(True, help="on GPUs: fp32 matmuls and attention on TF32 tensor cores (Ampere and newer)")
    progress: bool = option(True, help="show a progress bar")
    labels: str | None = option(
        None,
        help=(
            "classify, pair, ner: the label set, as a comma-separated list or a file with one label per line, "
            "in the model's id order; a label outside it in --train or --eval is an error naming file:line "
            "(default: the training file's labels, sorted)"
        ),
    )
    min_label_count: int = option(
        2,
        help=(
            "without --labels: a label seen fewer times than this in --train is an error (a typo, not a "
            "class), naming the label, its count and its first file:line; 0 or 1 accepts every label"
        ),
    )
    overwrite: bool = option(
        False,
        help=(
            "replace the fine-tuning run that --out already holds (its best/, init/, state/, metrics.jsonl, "
            "eval_results.json, predictions.jsonl); without it such an --out is refused"
        ),
    )
    resume: str | None = option(
        None,
        help=(
            "'auto': continue the interrupted run in --out from OUT/state (saved every epoch and on SIGINT/SIGTERM) "
            "with the same arguments, or start afresh when --out holds no run; --resume OUT (or OUT/state): "
            "the same, but a missing state is an error"
        ),
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {tuple(TASKS)}, got {self.task!r}")
        TASKS[self.task].check_args(self)
        if self.min_label_count < 0:
            raise ValueError(f"--min-label-count must be 0 or more, got {self.min_label_count}")


def resolve_model_dir(source: str, work: Path) -> Path:
    """An HF-format directory for ``source``: itself, or an export of a fastbert run / checkpoint."""
    path = Path(source)
    if (path / "config.json").exists() and any((path / n).exists() for n in ("model.safetensors", "pytorch_model.bin")):
        return path
    from fastbert.train.export import export

    return export(path, work / "init")


class RunExistsError(ValueError):
    """``--out`` already holds a fine-tuning run and ``--overwrite`` was not given."""


def check_out(out: Path, overwrite: bool, resume: str | None = None) -> list[Path]:
    """The run files ``out`` already holds (to be removed under ``overwrite``); refused without it. ``resume`` is
    the --resume given for an ``out`` with no state to resume from (the message then says why nothing resumes)."""
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"--out {out}: exists and is not a directory")
    held = [out / name for name in RUN_FILES if (out / name).exists()]
    if held and not overwrite:
        names = ", ".join(p.name for p in held)
        if resume:
            what = "a finished fine-tuning run" if (out / "eval_results.json").exists() else "a fine-tuning run"
            raise RunExistsError(
                f"--resume {resume}: --out {out} holds {what} ({names}) with no {STATE}/ to resume from; pass "
                f"--overwrite to replace it, or pick another directory"
            )
        raise RunExistsError(
            f"--out {out} already holds a fine-tuning run ({names}); pass --overwrite "
            f"to replace it, or pick another directory"
        )
    return held


class ResumeError(ValueError):
    """``--resume`` cannot continue the run in ``--out``: no state, other arguments or inputs, another world."""


class FinetuneInterrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM at a step boundary, after saving its state in ``OUT/state``.

    A ``KeyboardInterrupt``, so that nothing catching ``Exception`` swallows the stop and the CLI exits 130 with the
    message; ``result`` holds ``stopped`` (the signal's name, or "a signal on another rank"), ``epoch`` (1-based,
    the one in progress), ``step``, ``steps`` (the run's total) and ``state`` (the directory)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def find_state(out: Path) -> Path | None:
    """The resumable state in ``out``: ``OUT/state``, or the previous one should a crash have come between the two
    renames that replace it; None when there is none."""
    if (out / STATE).exists():
        return out / STATE
    if (out / STATE_OLD / checkpoint.MANIFEST).exists():
        return out / STATE_OLD
    return None


def _resume_state(args: FinetuneArgs, out: Path) -> Path | None:
    """The state directory that ``--resume`` continues from, None for a fresh run; a clear error when --resume
    names something else than --out or, not being 'auto', finds no state."""
    if not args.resume:
        return None
    if args.resume != "auto":
        given = Path(args.resume).resolve()
        if given not in (out.resolve(), (out / STATE).resolve()):
            raise ResumeError(
                f"--resume {args.resume}: a fine-tuning run resumes in its own --out; give --resume auto or "
                f"--resume {out}"
            )
    found = find_state(out)
    if found is None and args.resume != "auto":
        raise ResumeError(
            f"--resume {args.resume}: no state to resume from in {out} (no {out / STATE}); a run saves it at the end "
            f"of every epoch and when stopped by SIGINT/SIGTERM (--resume auto starts afresh when there is none)"
        )
    return found


def _read_trainer_state(state: Path) -> dict:
    try:
        saved = json.loads((state / TRAINER_STATE).read_text())
        saved["args"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResumeError(
            f"{state}: no readable {TRAINER_STATE} ({e}); this is no state saved by finetune, or it was damaged: "
            f"pass --overwrite (without --resume) to start over"
        ) from e
    return saved


def _check_same_run(args: FinetuneArgs, saved: dict, state: Path) -> None:
    """Refuse to resume a state saved with other arguments (those of ``RESUME_FREE`` aside)."""
    new = asdict(args)
    keys = [k for k in sorted(set(new) | set(saved["args"])) if k not in RESUME_FREE]
    diff = [
        f"{k}: saved {saved['args'].get(k)!r}, now {new.get(k)!r}" for k in keys if saved["args"].get(k) != new.get(k)
    ]
    if diff:
        raise ResumeError(
            f"--resume {args.resume}: {state} was saved by a run with other arguments ({'; '.join(diff)}); resume "
            f"with the same arguments, or start over with --overwrite (without --resume)"
        )


def _input_digests(args: FinetuneArgs) -> dict[str, str]:
    """sha256 of the files the training and its metrics depend on, so that a resumed run reads what it started on."""
    return {k: checkpoint.sha256_file(Path(v)) for k, v in (("train", args.train), ("eval", args.eval)) if v}


def _check_same_inputs(saved: dict, digests: dict, label_names, world: int, engine: str, precision: str, state):
    changed = [k for k in sorted(set(digests) | set(saved["inputs"])) if digests.get(k) != saved["inputs"].get(k)]
    if changed:
        raise ResumeError(
            f"{state}: --{' and --'.join(changed)} changed since the state was saved (sha256 differs); resuming "
            f"would not continue the same run: restore the file, or start over with --overwrite (without --resume)"
        )
    if saved["label_names"] != label_names:
        raise ResumeError(f"{state}: labels {saved['label_names']} when saved, {label_names} now")
    where = (saved["world_size"], saved["engine"], saved["precision"])
    if where != (world, engine, precision):
        raise ResumeError(
            f"{state}: saved by {saved['world_size']} rank(s) of the {saved['engine']} engine in "
            f"{saved['precision']}, resumed by {world} of the {engine} engine in {precision}; resume it the way "
            f"it ran (the same launcher and number of ranks, --deepspeed/--zero-stage, device)"
        )


def check_model(source: str):
    """The tokenizer of ``source`` (an HF directory, or a run directory / checkpoint to export), read without writing
    anything, so that a bad --model fails before --out is touched."""
    from fastbert.config import BertConfig
    from fastbert.tokenizer import WordPieceTokenizer
    from fastbert.train import checkpoint

    path = Path(source)
    if not path.exists():
        raise checkpoint.CheckpointNotFound(f"--model {source}: no such file or directory")
    if (path / "config.json").exists() and any((path / n).exists() for n in ("model.safetensors", "pytorch_model.bin")):
        from fastbert import deberta

        if deberta.is_deberta_dir(path):
            deberta.DebertaConfig.from_pretrained(path)
            if not (path / "vocab.txt").exists():
                raise checkpoint.CheckpointNotFound(
                    f"--model {source}: a DeBERTa directory without vocab.txt; fastbert fine-tunes DeBERTa with a "
                    "WordPiece vocabulary (vocab.txt, as fastbert's DeBERTa pretraining writes), not SentencePiece"
                )
        else:
            BertConfig.from_json_file(path / "config.json")
        return WordPieceTokenizer.from_pretrained(path)
    ckpt = checkpoint.resolve(path)
    if not (ckpt / "vocab.txt").exists():
        raise checkpoint.CheckpointNotFound(f"{ckpt}: no vocab.txt beside the checkpoint (cannot fine-tune it)")
    return WordPieceTokenizer.from_pretrained(ckpt)


# Batches and the model ---------------------------------------------------------------------------------------------
def _batches(items: list, size: int, shuffle_seed: int | None = None) -> list[list]:
    order = list(range(len(items)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [[items[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


def head_class(task, model_dir: Path):
    """The class of ``task``'s head for the checkpoint in ``model_dir``: BERT's, or DeBERTa's for a DeBERTa one."""
    from fastbert import deberta

    return deberta.TASK_HEADS[task.head.__name__] if deberta.is_deberta_dir(model_dir) else task.head


def build_model(args: FinetuneArgs, model_dir: Path, label_names: list[str] | None):
    """The task's head on the encoder of ``model_dir`` (the head newly initialised unless the checkpoint has it)."""
    task = TASKS[args.task]
    overrides = {}
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    overrides.update(task.head_config(label_names))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*newly initialised.*")
        model, info = head_class(task, model_dir).from_pretrained(model_dir, output_loading_info=True, **overrides)
    log.info("new task-head weights: %s", info.missing_keys)
    return model


@torch.no_grad()
def predict(model, task: Task, examples: list, device: torch.device, with_scores: bool = False) -> list:
    """One prediction per example, decoded by the task; with ``with_scores``, (prediction, scores) pairs, the
    scores being what predictions.jsonl adds to each line (see each task's ``decode``)."""
    model.eval()
    features = task.features(examples)
    outputs = []
    for batch in _batches(features, task.args.batch_size * 2):
        outputs += task.outputs(model(**model_inputs(task.collate(batch, with_labels=False), device)))
    model.train()
    return task.decode(model, examples, features, outputs, with_scores)


# Engines ----------------------------------------------------------------------------------------------------------
class _PlainEngine:
    """One process: the model, a fused AdamW, gradient clipping at 1, bf16 autocast when asked."""

    rank, world = 0, 1

    def __init__(self, args: FinetuneArgs, model: torch.nn.Module, device: torch.device, precision: str):
        self.module, self.device = model.to(device).train(), device
        self.optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, inputs: dict | None, weight: torch.Tensor) -> torch.Tensor:
        """One step; returns the (detached) loss on the device, unread."""
        if inputs is None:  # a batch with nothing to learn from (NER sentences without a labelled token)
            return torch.zeros((), device=self.device)
        with self.autocast:
            loss = self.module(**inputs).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        return loss.detach()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather(self, items: list) -> list:
        return items

    def fp32_model(self) -> torch.nn.Module:
        return self.module

    def barrier(self) -> None:
        pass

    def save_state(self, staging: Path) -> None:
        """The weights (fp32: autocast leaves the parameters in fp32) and optimizer state, in ``staging/state``."""
        _save_tensors(
            {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
            staging / STATE / PLAIN_STATE,
        )

    def load_state(self, state: Path) -> None:
        checkpoint.verify_manifest(state)
        saved = torch.load(state / PLAIN_STATE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])


class _DeepSpeedEngine:
    """The model in a DeepSpeed engine (ZeRO 0-2, bf16 or fp32) on every rank of the launcher's world.

    Every rank sees the same global batches and trains on its contiguous slice of each. The local loss is weighted by
    the slice's share of the batch's examples (labelled tokens for NER), so that DeepSpeed's gradient average over
    ranks is the gradient of the whole batch's mean loss, as in one process; a rank whose slice of a short last
    batch is empty contributes zero gradients.
    """

    def __init__(self, args: FinetuneArgs, model: torch.nn.Module, device: torch.device, precision: str):
        import deepspeed
        import torch.distributed as dist

        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if args.batch_size % self.world:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {self.world}")
        config: dict = json.loads(Path(args.deepspeed).read_text()) if args.deepspeed else {}
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "optimizer",
            "scheduler",
        ):
            if key in config:
                raise ValueError(
                    f"{args.deepspeed}: {key!r} comes from fastbert's arguments "
                    f"(--batch-size, AdamW with warmup and linear decay); remove it"
                )
        zero = config.setdefault("zero_optimization", {})
        if args.zero_stage is not None:
            zero["stage"] = args.zero_stage
        if zero.get("stage", 0) not in (0, 1, 2):
            raise ValueError(
                f"ZeRO stage {zero['stage']} is not offered for fine-tuning (evaluation and best-model "
                f"saving read whole parameters on every rank); use --zero-stage 0, 1 or 2"
            )
        config.update(
            train_batch_size=args.batch_size,
            train_micro_batch_size_per_gpu=args.batch_size // self.world,
            gradient_accumulation_steps=1,
            gradient_clipping=1.0,
            zero_allow_untested_optimizer=True,
            steps_per_print=10**9,
        )
        if precision == "bf16":
            config["bf16"] = {"enabled": True}
        optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.module.train()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, inputs: dict | None, weight: torch.Tensor) -> torch.Tensor:
        """One step; returns the (detached) local loss on the device, unread."""
        # A rank with nothing of this batch still takes part in the gradient exchange, with zeros.
        loss = sum((p * 0).sum() for p in self.module.parameters()) if inputs is None else self.engine(**inputs).loss
        self.engine.backward(loss * weight.to(loss.dtype))
        self.engine.step()
        return loss.detach()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor on this rank's device (the communication device: NCCL refuses others)."""
        values = values.clone()
        self.dist.all_reduce(values)
        return values

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (its ``rank::world`` share of a list), put back in the list's order."""
        parts = [None] * self.world
        self.dist.all_gather_object(parts, items)
        out = [None] * sum(len(p) for p in parts)
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out

    def fp32_model(self) -> torch.nn.Module:
        """The model with fp32 master weights (assembled from the ZeRO partitions; a collective call)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            state[name] = (full if full is not None else p.detach()).float().cpu()
        model = type(self.module)(self.module.config)
        model.load_state_dict(state, strict=False)
        return model

    def barrier(self) -> None:
        self.dist.barrier()

    def save_state(self, staging: Path) -> None:
        """DeepSpeed's checkpoint (module, ZeRO partitions of the fp32 weights and optimizer state) in
        ``staging/state``; every rank writes its part. (DeepSpeed copies its zero_to_fp32 scripts into ``staging``.)"""
        self.engine.save_checkpoint(str(staging), tag=STATE, save_latest=False)

    def load_state(self, state: Path) -> None:
        # checkpoint.load checks the manifest and that every .pt file loads with weights_only=True before DeepSpeed
        # (which loads with weights_only=False) reads it.
        checkpoint.load(self.engine, state)


def _slice(batch: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share of ``batch``; shares differ in size by at most one."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]


def model_inputs(collated: dict[str, torch.Tensor], device: torch.device) -> dict:
    """A collated (host) batch as the model takes it on ``device``: the attention mask becomes the batch's
    ``Layout``, built here on the host so that unpadding on the device reads nothing back; pinned for a GPU."""
    inputs = dict(collated)
    if "attention_mask" in inputs:
        inputs["attention_mask"] = Layout.from_attention_mask(inputs["attention_mask"])
    if device.type == "cuda":
        inputs = pin(inputs)
    return to_device(inputs, device)


def _wants_deepspeed(args: FinetuneArgs) -> bool:
    import os

    return bool(args.deepspeed) or args.zero_stage is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1


# The job ----------------------------------------------------------------------------------------------------------
def default_lr(hidden_size: int) -> float:
    """Fine-tuning's default learning rate by model width: 3e-5 for BERT-base and wider (the BERT paper's range is
    2e-5 to 5e-5), 1e-4 up to 512, 5e-4 up to 256: small models need larger steps (Turc et al. 2019 tune BERT-mini
    and -small at 1e-4 to 3e-4), and 3e-5 leaves the tiny preset at chance."""
    if hidden_size >= 768:
        return 3e-5
    return 1e-4 if hidden_size > 256 else 5e-4


def finetune(
    args: FinetuneArgs,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Fine-tune and evaluate; returns the best epoch's metrics (the same on every rank).

    Everything given is checked before anything is written to ``--out``: the output directory (a run already there
    is refused without ``--overwrite``; with ``--resume`` its state must come from a run with the same arguments
    and inputs), the model, the training, evaluation and prediction files and their labels. A run that fails
    before its first epoch or state is recorded leaves no ``--out`` it created.

    ``on_epoch(record)`` is called after each epoch's metrics row and state are written, ``on_step(step)`` after
    each optimizer step. A first SIGINT/SIGTERM saves the state at the next step boundary and raises
    :class:`FinetuneInterrupted`; a second raises ``KeyboardInterrupt`` at once."""
    out = Path(args.out)
    resume, stale = _check_resume_or_out(args, out)
    device = default_device()
    set_tf32(args.tf32)
    precision = _precision(args, device)
    check_model(args.model)
    task = TASKS[args.task](args)
    train, eval_examples, predict_examples = task.read_inputs()
    resume.digests = _input_digests(args)
    job = Job(args, task, out, device, precision, _wants_deepspeed(args), on_epoch, on_step, resume)
    _start_ranks(job)
    created = _prepare_out(job, stale)
    try:
        return _run(job, train, eval_examples, predict_examples)
    except BaseException:
        if job.rank == 0 and created and not job.recorded:
            shutil.rmtree(out, ignore_errors=True)
        raise


@dataclass
class Resume:
    """What a run needs to save and resume state: the state to resume from (or None), its trainer state, the
    input digests, and the arguments as given (saved, and compared on resume, before --lr gets its default)."""

    state: Path | None
    saved: dict | None
    given: FinetuneArgs
    digests: dict = dataclasses.field(default_factory=dict)


@dataclass
class Job:
    """What a fine-tuning run is given and where it runs: the arguments (with --lr's default once the model is
    known), the task, --out, the device and precision, whether DeepSpeed runs it, the hooks, what it resumes, this
    rank, and whether it has recorded anything in --out yet (an epoch's row or a state: --out is then kept)."""

    args: FinetuneArgs
    task: Task
    out: Path
    device: torch.device
    precision: str
    distributed: bool
    on_epoch: Callable[[dict], None] | None
    on_step: Callable[[int], None] | None
    resume: Resume
    rank: int = 0
    recorded: bool = False


def _check_resume_or_out(args: FinetuneArgs, out: Path) -> tuple[Resume, list[Path]]:
    """What ``--resume`` continues from (its state checked against the arguments), or for a fresh run the files of
    an earlier run in ``out`` that ``--overwrite`` removes (refused without it)."""
    resume_from = _resume_state(args, out)
    if resume_from is None:
        return Resume(None, None, args), check_out(out, args.overwrite, args.resume)
    if not (resume_from / checkpoint.MANIFEST).exists():
        raise ResumeError(
            f"{resume_from}: no {checkpoint.MANIFEST}, so the state is incomplete; pass --overwrite (without "
            f"--resume) to start over"
        )
    saved = _read_trainer_state(resume_from)
    _check_same_run(args, saved, resume_from)
    return Resume(resume_from, saved, args), []


def _precision(args: FinetuneArgs, device: torch.device) -> str:
    precision = args.precision if args.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {args.precision!r}")
    return precision


def _start_ranks(job: Job) -> None:
    """Join the launcher's ranks (under DeepSpeed) and, when resuming, check that the inputs, labels, world and
    engine are those the state was saved with."""
    world = 1
    if job.distributed:
        import torch.distributed as dist

        from fastbert.train.distributed import init_distributed

        init_distributed(job.args.dist_timeout)
        job.rank, world = dist.get_rank(), dist.get_world_size()
    resume = job.resume
    if resume.saved is not None:
        engine_kind = "deepspeed" if job.distributed else "plain"
        _check_same_inputs(
            resume.saved, resume.digests, job.task.label_names, world, engine_kind, job.precision, resume.state
        )


def _prepare_out(job: Job, stale: list[Path]) -> bool:
    """``--out`` made ready on rank 0 once every rank has checked it: the previous run's files gone (--overwrite),
    no half-written state left; returns whether this run created it."""
    if job.distributed:
        import torch.distributed as dist

        dist.barrier()  # every rank has checked --out before rank 0 writes to it
    created = not job.out.exists()
    if job.rank == 0:
        for path in stale:  # --overwrite: the previous run's files go, so that none of them outlives it
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        shutil.rmtree(job.out / STATE_NEW, ignore_errors=True)
        job.out.mkdir(parents=True, exist_ok=True)
    return created


def _run(job: Job, train: list, eval_examples: list, predict_examples: list | None) -> dict:
    """Build the model and engine, train every epoch (from the saved position when resuming), write the results."""
    from fastbert.tokenizer import WordPieceTokenizer

    model_dir = _model_dir(job)
    torch.manual_seed(job.args.seed)
    np.random.seed(job.args.seed)
    job.task.tokenizer = WordPieceTokenizer.from_pretrained(model_dir)
    model = build_model(job.args, model_dir, job.task.label_names)
    if job.args.lr is None:
        job.args = job.task.args = dataclasses.replace(job.args, lr=default_lr(model.config.hidden_size))
        log.info(
            "learning rate %g, the default for hidden size %d (--lr to choose)", job.args.lr, model.config.hidden_size
        )
    engine = (_DeepSpeedEngine if job.distributed else _PlainEngine)(job.args, model, job.device, job.precision)
    training = _Training(job, engine, job.task.features(train), eval_examples)
    training.run()
    return _finish(job, engine, training.position, bool(eval_examples), predict_examples)


def _model_dir(job: Job) -> Path:
    """The model as an HF directory; a run directory or checkpoint is exported (by rank 0 alone) into --out."""
    if not job.distributed:
        return resolve_model_dir(job.args.model, job.out)
    import torch.distributed as dist

    found = [resolve_model_dir(job.args.model, job.out) if job.rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


@dataclass
class Position:
    """Where the run is and what it has found: besides the engine's weights and RNG states, what a state holds."""

    epoch: int  # the epoch in progress, 0-based
    batch: int  # the batches of it done
    step: int
    epoch_seconds: float  # the epoch's training seconds so far (before a stop, on resume)
    loss_sum: torch.Tensor  # this rank's share-weighted loss sum of the epoch so far, on the device
    records: list[dict]  # the metrics rows of the epochs done
    best: float  # the best epoch's main metric so far
    best_metrics: dict


class _Training:
    """The epochs of one run over a built engine: the steps, each epoch's metrics row, evaluation and best model,
    the state saved at every epoch's end and on a stop, and the stop itself."""

    def __init__(self, job: Job, engine, features: list, eval_examples: list):
        self.job, self.engine, self.features, self.eval_examples = job, engine, features, eval_examples
        self.rank, self.world = engine.rank, engine.world
        self.steps_per_epoch = math.ceil(len(features) / job.args.batch_size)
        self.total = self.steps_per_epoch * job.args.epochs
        self.warmup = int(job.args.warmup_ratio * self.total)
        self.metrics_path = job.out / "metrics.jsonl"
        self.position, self.own = self._start_position()
        self.state_at = (self.position.epoch, self.position.batch) if self.own is not None else None
        if self.rank == 0:  # on resume, the rows of the epochs the state has seen (a later row is written again)
            rows = "".join(json.dumps(r) + "\n" for r in self.position.records)
            write_atomic(self.metrics_path, rows.encode())

    def _start_position(self) -> tuple[Position, dict | None]:
        """The start of the run, or the position of the state it resumes (loaded into the engine) with this rank's
        own part of that state (its RNG states and loss sum)."""
        device, resume = self.job.device, self.job.resume
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if resume.state is None:
            return Position(0, 0, 0, 0.0, zero, [], float("-inf"), {}), None
        saved = resume.saved
        self.engine.load_state(resume.state)
        own = checkpoint.load_weights_only(resume.state / f"rank{self.rank}.pt")
        best = float("-inf") if saved["best"] is None else saved["best"]
        position = Position(
            saved["epoch"], saved["batch"], saved["step"], saved["epoch_seconds"], own["loss_sum"].to(device),
            saved["records"], best, saved["best_metrics"],
        )  # fmt: skip
        log.info(
            "resumed from %s: epoch %d, step %d of %d", resume.state, position.epoch + 1, position.step, self.total
        )
        return position, own

    def run(self) -> None:
        from tqdm import tqdm

        args = self.job.args
        self.bar = tqdm(
            total=self.total,
            initial=self.position.step,
            desc=f"finetune {args.task}",
            unit="step",
            disable=not args.progress or self.rank != 0,
        )
        self.stop = StopRequest("finetune", "the run's state", announce=self.rank == 0)
        if self.own is not None:  # last: building the model and the engine drew random numbers
            checkpoint.set_rng_state(self.own["rng"])
        try:
            for epoch in range(self.position.epoch, args.epochs):
                self.position.epoch = epoch
                record = self._train_epoch()
                if self.job.on_epoch is not None:
                    self.job.on_epoch(record)
            # Training is done; a signal that came during the last evaluation stops before the results are written.
            flag = torch.tensor([float(self.stop.requested)], dtype=torch.float64).to(
                self.job.device, non_blocking=True
            )
            if self.stop.requested if self.world == 1 else bool(self.engine.all_sum(flag)[0] > 0):
                raise self._stopped(args.epochs - 1, self.job.out / STATE)
        finally:
            self.stop.restore()
            self.bar.close()

    def _train_epoch(self) -> dict:
        """The rest of the epoch in progress, then its metrics row and the state at its end."""
        position, args = self.position, self.job.args
        batches = _batches(self.features, args.batch_size, shuffle_seed=args.seed * 1000 + position.epoch)
        started = time.perf_counter()
        for index in range(position.batch, len(batches)):
            self._step(batches[index], index, started)
        record = self._epoch_record(position.epoch_seconds + time.perf_counter() - started)
        position.epoch += 1
        position.batch, position.epoch_seconds = 0, 0.0
        position.loss_sum = torch.zeros((), dtype=torch.float64, device=self.job.device)
        self._save_state()
        self.state_at = (position.epoch, 0)
        return record

    def _step(self, batch: list, index: int, started: float) -> None:
        """One optimizer step on this rank's slice of ``batch`` (the epoch's ``index``-th), or the stop before it."""
        job, engine, position = self.job, self.engine, self.position
        mine = _slice(batch, self.rank, self.world)
        collated = job.task.collate(mine) if mine else None
        count = job.task.loss_count(collated) if collated is not None else 0
        # This rank's count of what the batch's loss is a mean over, and whether it was asked to stop: summed over
        # ranks in one exchange, so that every rank stops at the same step boundary.
        local = torch.tensor([float(count), float(self.stop.requested)], dtype=torch.float64)
        local = local.to(job.device, non_blocking=True)
        summed = engine.all_sum(local)
        if self.stop.requested if self.world == 1 else bool(summed[1] > 0):  # a host sync only with several ranks
            state = job.out / STATE
            if self.state_at != (position.epoch, index):
                position.batch = index
                position.epoch_seconds += time.perf_counter() - started
                state = self._save_state()
            raise self._stopped(position.epoch, state)
        engine.set_lr(warmup_poly_lr(position.step, job.args.lr, self.warmup, self.total))
        inputs = model_inputs(collated, job.device) if count else None
        share = local[0] / summed[0].clamp(min=1)  # this rank's share of the batch, on the device
        loss = engine.train_step(inputs, share * self.world)
        position.loss_sum += loss.double() * share
        position.step += 1
        self.bar.update(1)
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{float(loss):.4f}")  # the step's one read back, for the bar only
        if job.on_step is not None:
            job.on_step(position.step)

    def _epoch_record(self, seconds: float) -> dict:
        """The epoch's metrics row (training loss and speed, evaluation), written to metrics.jsonl; the best model
        so far (by the task's main metric) saved in OUT/best."""
        job, position = self.job, self.position
        record = {
            "epoch": position.epoch + 1,
            "step": position.step,
            "train_loss": float(self.engine.all_sum(position.loss_sum)) / self.steps_per_epoch,
            "train_seconds": seconds,
            "train_examples_per_s": len(self.features) / seconds,
        }
        if self.eval_examples:
            mine = self.eval_examples[self.rank :: self.world]
            predictions = self.engine.gather(predict(self.engine.module, job.task, mine, job.device))
            record.update({f"eval_{k}": v for k, v in job.task.metrics(self.eval_examples, predictions).items()})
            score = record[f"eval_{job.task.main_metric}"]
            if score > position.best:
                position.best, position.best_metrics = score, record
                _save(self.engine, job.task.tokenizer, job.out / "best")
        position.records.append(record)
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", position.epoch + 1, record)
        return record

    def _save_state(self) -> Path:
        position, job = self.position, self.job
        trainer = {
            "format": 1,
            "epoch": position.epoch,
            "batch": position.batch,
            "step": position.step,
            "steps": self.total,
            "epoch_seconds": position.epoch_seconds,
            "best": None if position.best == float("-inf") else position.best,
            "best_metrics": position.best_metrics,
            "records": position.records,
            "label_names": job.task.label_names,
            "inputs": job.resume.digests,
            "world_size": self.world,
            "engine": "deepspeed" if job.distributed else "plain",
            "precision": job.precision,
            "args": asdict(job.resume.given),
        }
        path = _save_state(self.engine, job.out, trainer, position.loss_sum)
        job.recorded = True
        return path

    def _stopped(self, epoch: int, state: Path) -> FinetuneInterrupted:
        by, step, total = self.stop.signal or "a signal on another rank", self.position.step, self.total
        result = {"stopped": by, "epoch": epoch + 1, "step": step, "steps": total, "state": str(state)}
        return FinetuneInterrupted(
            f"{by}: state saved in {state} at step {step} of {total} (epoch {epoch + 1} of {self.job.args.epochs}); "
            f"continue with: fastbert finetune --resume auto --out {self.job.out} (and the same options)",
            result,
        )


def _finish(job: Job, engine, position: Position, evaluated: bool, predict_examples: list | None) -> dict:
    """The results (the best epoch's metrics, or the last epoch's without --eval, whose model is then the one
    kept) in OUT/eval_results.json, the predictions of the best model, and the state removed."""
    out, rank = job.out, engine.rank
    if not evaluated:
        _save(engine, job.task.tokenizer, out / "best")
        position.best_metrics = position.records[-1]
    results = {
        **position.best_metrics,
        "task": job.args.task,
        "world_size": engine.world,
        "precision": job.precision,
        "skipped_rows": job.task.bad.skipped,
        "args": asdict(job.args),
    }
    if rank == 0:
        write_atomic(out / "eval_results.json", (json.dumps(results, indent=2) + "\n").encode())
    if predict_examples is not None and rank == 0:
        best_model = head_class(job.task, out / "best").from_pretrained(out / "best").to(job.device)
        predictions = predict(best_model, job.task, predict_examples, job.device, with_scores=True)
        lines = [
            json.dumps({"where": ex.where, "prediction": p, **scores})
            for ex, (p, scores) in zip(predict_examples, predictions, strict=True)
        ]
        write_atomic(out / "predictions.jsonl", ("\n".join(lines) + "\n").encode())
    engine.barrier()
    if rank == 0:  # a finished run needs no state (and is refused by --resume)
        for name in (STATE, STATE_OLD):
            shutil.rmtree(out / name, ignore_errors=True)
    return results


def _save(engine, tokenizer, directory: Path) -> None:
    """The model in fp32 with its tokenizer, in HF format; rank 0 writes, the others wait."""
    model = engine.fp32_model()
    if engine.rank == 0:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    engine.barrier()


def _save_tensors(obj, path: Path) -> None:
    """``torch.save`` to ``path``, flushed to disk (the file is part of a directory renamed into place whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_state(engine, out: Path, trainer: dict, loss_sum: torch.Tensor) -> Path:
    """Replace ``OUT/state`` with the run's state, on every rank: written in ``OUT/.state-new/state``, checked
    into a MANIFEST.json, then put in place by ``replace_directory`` with ``OUT/.state-old`` as the place the old
    state waits until the new one is in, so a crash at any moment leaves one complete state that ``find_state``
    finds, the new one or the previous one.

    Holds the engine's weights and optimizer state, ``rank{r}.pt`` per rank (every RNG state, drawn after
    everything else of the save, and the rank's loss sum of the epoch in progress) and ``trainer_state.json``."""
    staging = out / STATE_NEW
    if engine.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / STATE).mkdir(parents=True)
    engine.barrier()
    engine.save_state(staging)
    target = staging / STATE
    _save_tensors(
        {"rng": checkpoint.rng_state(), "loss_sum": loss_sum.detach().cpu()}, target / f"rank{engine.rank}.pt"
    )
    finite = checkpoint.weights_finite(engine)
    if engine.rank == 0:
        write_atomic(target / TRAINER_STATE, (json.dumps(trainer, indent=1) + "\n").encode())
    engine.barrier()
    if engine.rank == 0:
        checkpoint.write_manifest(target, finite)
        replace_directory(target, out / STATE, aside=out / STATE_OLD)
        shutil.rmtree(staging, ignore_errors=True)
    engine.barrier()
    return out / STATE
