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

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fastbert import deberta_electra, electra
from fastbert.atomic import write_atomic
from fastbert.config import PRESETS, BertConfig, read_model_config
from fastbert.data.masking import MASKING_SCHEMES, MLM_PROBABILITY, MaskingCollator
from fastbert.data.sampler import MicroBatchDataset, MicroBatchPlan
from fastbert.data.shards import ShardDataset, vocab_sha256
from fastbert.deberta import DEBERTA_PRESETS, DebertaConfig, DebertaForPreTraining
from fastbert.model import BertForPreTraining
from fastbert.optim import AdamW, Lamb, budget_lr, parameter_groups, parse_budget, warmup_poly_lr
from fastbert.optim.lamb import LambSetupError
from fastbert.options import option
from fastbert.train import checkpoint
from fastbert.train.distributed import init_distributed, pin, set_tf32
from fastbert.train.evaluation import evaluate, held_out_batches
from fastbert.train.flops import peak_flops, training_flops
from fastbert.train.metrics_log import MetricsLog
from fastbert.train.priors import init_output_biases
from fastbert.train.step import SUMS, optimizer_step, step_metrics
from fastbert.train.stopping import StopRequest

log = logging.getLogger("fastbert.train")


PRECISIONS = ("fp32", "bf16", "fp16")
# What the model learns from the tokens: BERT's masked-LM, or ELECTRA's replaced-token detection (fastbert.electra).
# The sentence objective (NSP, SOP or none) comes from the shards.
PRETRAIN_OBJECTIVES = ("mlm", "electra")
OPTIMIZERS = ("lamb", "adamw")
DEFAULT_STEPS = 1000


class TrainingDivergedError(RuntimeError):
    """Training stopped: too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


class TrainingSetupError(ValueError):
    """Arguments, data or checkpoints that cannot make a training run; raised before the first step."""


@dataclass
class PretrainArgs:
    data: str = option(help="directory written by prepare-data")
    out: str = option(help="run directory (checkpoints, metrics, TensorBoard)")
    model: str = option(
        "tiny",
        help=f"preset ({', '.join([*PRESETS, *DEBERTA_PRESETS])}) or a config.json (BERT family or deberta-v2)",
    )
    objective: str = option(
        "mlm",
        help="mlm (BERT's masked LM) or electra (a generator fills the masks, the --model discriminator spots "
        "replaced tokens; needs shards prepared with --objective none)",
        choices=PRETRAIN_OBJECTIVES,
    )
    generator_size: float | None = option(
        None,
        help=f"electra: the generator's hidden size, heads and FFN as a fraction of --model's (default "
        f"{electra.GENERATOR_SIZE}; DeBERTa: 1, its embeddings are shared at one width)",
    )
    generator_layers: int | None = option(
        None, help="electra: the generator's layers (default: --model's; DeBERTa: half of them)"
    )
    discriminator_weight: float = option(
        electra.DISCRIMINATOR_WEIGHT, help="electra: lambda, the weight of the discriminator's loss"
    )
    sampling_temperature: float = option(
        1.0,
        help="electra: the generator's draws come from softmax(logits / T); above 1 they are rarer words, easier "
        "to spot (held-out AUC is then worth reporting at T = 1 too)",
    )
    seq_len: int | None = option(None, help="longest sequence (default: the data's sequence length)")
    global_batch: int = option(32, help="sequences per optimizer step, over all ranks")
    micro_batch: int = option(8, help="sequences per forward pass on one rank (accumulation makes up the rest)")
    steps: int | None = option(
        None, help=f"optimizer steps (default {DEFAULT_STEPS}); with --budget, a cap on them (default: none)"
    )
    budget: str | None = option(
        None,
        help="train to a time budget (90s, 10m, 2h): the learning rate follows the elapsed share of it (start-up, "
        "data loading and saves count, as on your clock) and the run ends at the budget with a checkpoint and, "
        "with --eval-data, an evaluation; --warmup below 1 is then a fraction of the budget",
    )
    optimizer: str = option(
        "lamb", help="lamb (NVIDIA's: layer adaptation where weight decay applies) or adamw", choices=OPTIMIZERS
    )
    lr: float = option(1e-3, help="peak learning rate")
    warmup: float = option(
        100, help="warmup: a number of steps, or a fraction of --steps (of --budget) when below 1 (0.01: 1%%)"
    )
    decay_power: float = option(1.0, help="power of the polynomial decay after warmup (0.5 or 1)")
    weight_decay: float = option(0.01, help="decoupled weight decay (not on biases and LayerNorm)")
    max_trust_ratio: float = option(10.0, help="cap on LAMB's per-parameter trust ratio")
    lamb_adapt_all: bool = option(
        False,
        help="LAMB's trust ratio on every tensor, biases and LayerNorm included (the paper as written; fastbert's "
        "earlier default); by default, as NVIDIA's LAMB, only on the tensors with weight decay",
    )
    grad_clip: float = option(1.0, help="clip the global gradient norm to this (0: off)")
    zero_stage: int = option(
        0, help="DeepSpeed ZeRO stage (3 is refused: LAMB needs whole parameters)", choices=(0, 1, 2, 3)
    )
    precision: str = option(
        "fp32", help="fp32, bf16 (mixed, fp32 master weights) or fp16 (GPU only)", choices=PRECISIONS
    )
    deepspeed: str | None = option(None, help="extra DeepSpeed config JSON merged into fastbert's")
    resume: str | None = option(None, help="'auto' (the latest checkpoint of --out, if any) or a checkpoint path")
    init_from: str | None = option(
        None,
        help="start from this checkpoint's weights (e.g. for phase 2); with --objective electra, an MLM checkpoint "
        "of the discriminator's shape gives the discriminator its encoder and the shared token embeddings (the "
        "generator's layers, both heads and the optimizer start fresh)",
    )
    reset_optimizer: bool = option(False, help="with --init-from: fresh optimizer state")
    save_every: int = option(0, help="checkpoint every N steps (and always at the end; 0: only at the end)")
    keep: int = option(3, help="checkpoints to keep")
    dropout: float | None = option(None, help="override the model's hidden and attention dropout")
    pre_ln: bool = option(
        False,
        help="pre-LN encoder (LayerNorm before each block and a final one: stable at higher rates; MLM-only models "
        "export as transformers' RobertaPreLayerNormForMaskedLM) instead of BERT's post-LN",
    )
    seed: int = option(0, help="seed of initialisation, data order and masking")
    loader_workers: int = option(0, help="data loader processes (0: in the training process)")
    whole_word: bool = option(False, help="mask whole words: a word's ## continuation pieces (from the vocab) with it")
    mask_rate: float = option(
        MLM_PROBABILITY,
        help="share of tokens selected for prediction (BERT: 0.15; Cramming 0.25, MosaicBERT 0.3); held-out "
        "evaluation always masks BERT's 0.15, so that runs compare",
    )
    unigram_init: bool = option(
        True,
        help="start the MLM output bias at the training shards' log-frequencies (ELECTRA: the generator's, and the "
        "discriminator's at the logit of the expected replaced share) instead of zero",
    )
    masking: str = option(
        "token",
        help="what is masked: tokens (BERT), whole words (as --whole-word) or span (SpanBERT: spans of whole words)",
        choices=MASKING_SCHEMES,
    )
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


def _model_config(args: PretrainArgs, vocab_size: int, objective: str, seq_len: int) -> BertConfig | DebertaConfig:
    if args.model in PRESETS:
        config = BertConfig.preset(args.model, vocab_size=vocab_size)
    elif args.model in DEBERTA_PRESETS:
        config = DebertaConfig.preset(args.model, vocab_size=vocab_size)
    else:
        config = read_model_config(args.model)
        if config.vocab_size != vocab_size:
            raise TrainingSetupError(
                f"{args.model}: vocab_size {config.vocab_size} but the data's vocabulary has {vocab_size} tokens"
            )
    if isinstance(config, DebertaConfig):
        return _deberta_config(args, config, objective, seq_len)
    changes = {"sentence_objective": objective, "max_position_embeddings": max(config.max_position_embeddings, seq_len)}
    if args.dropout is not None:
        changes.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    if args.pre_ln:
        changes["pre_layer_norm"] = True
    return config.replace(**changes)


def _deberta_config(args: PretrainArgs, config: DebertaConfig, objective: str, seq_len: int) -> DebertaConfig:
    """The run's DeBERTa config: MLM on shards without a sentence objective, post-LN; what it cannot train is
    refused, naming the flag or the data."""
    if objective != "none":
        raise TrainingSetupError(
            f"{args.data}: shards prepared for the sentence objective {objective!r}, but DeBERTa has none; prepare "
            "them with prepare-data --objective none"
        )
    if args.pre_ln:
        raise TrainingSetupError(f"--pre-ln with --model {args.model}: DeBERTa is post-LN")
    changes = {}
    if config.position_biased_input:  # absolute positions must cover the sequences; relative ones need nothing
        changes["max_position_embeddings"] = max(config.max_position_embeddings, seq_len)
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


def masking_collator(
    args: PretrainArgs, dataset: ShardDataset, vocab_tokens: list[str], mask_rate: float | None = None
) -> MaskingCollator:
    """The run's masking: ``--mask-rate`` (or ``mask_rate``; BERT's 15%) with 80/10/10 over ``--masking`` tokens or
    SpanBERT's spans; whole words (a word's ``##`` pieces with it) instead of tokens when asked by ``--whole-word``
    or by the shards' meta.json (``prepare-data --whole-word``)."""
    masking = args.masking
    if masking == "token" and (args.whole_word or bool(dataset.meta.get("whole_word", False))):
        masking = "whole-word"
    continuation_ids = (
        [i for i, token in enumerate(vocab_tokens) if token.startswith("##")] if masking != "token" else []
    )
    return MaskingCollator(
        len(vocab_tokens),
        list(dataset.special_ids.values()),
        dataset.special_ids["mask"],
        seed=args.seed,
        mlm_probability=args.mask_rate if mask_rate is None else mask_rate,
        pad_id=dataset.special_ids["pad"],
        masking=masking,
        continuation_ids=continuation_ids,
    )


def _collator(args: PretrainArgs, dataset: ShardDataset, vocab_tokens: list[str], mask_rate: float | None = None):
    """The run's masking collator; for ELECTRA it also keys each masked position's replacement draw."""
    collate = masking_collator(args, dataset, vocab_tokens, mask_rate)
    return electra.ReplacementKeys(collate, args.seed) if args.objective == "electra" else collate


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


BUDGET_STEP_CAP = 10**9  # the step cap of a --budget run given no --steps: the clock ends it


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning rate: ``steps`` optimizer steps with warmup + polynomial decay by step, or,
    with a time ``budget`` (seconds), warmup + decay by the elapsed share of it, ``steps`` then being a cap."""

    steps: int
    budget: float | None
    warmup: float  # steps; with a budget, a value below 1 is a fraction of it
    lr: float
    power: float

    @classmethod
    def from_args(cls, args: PretrainArgs) -> Schedule:
        budget = None
        if args.budget is not None:
            try:
                budget = parse_budget(args.budget)
            except ValueError as e:
                raise TrainingSetupError(f"--budget: {e}") from None
        if args.steps is not None and args.steps <= 0:
            raise TrainingSetupError(f"--steps {args.steps}: must be positive")
        steps = args.steps if args.steps is not None else DEFAULT_STEPS if budget is None else BUDGET_STEP_CAP
        if budget is not None and 0 <= args.warmup < 1:
            warmup = float(args.warmup)
        else:
            warmup = float(warmup_steps(args.warmup, steps))
        return cls(steps, budget, warmup, args.lr, args.decay_power)

    def rate(self, step: int, clock: float) -> float:
        """The learning rate of optimizer step ``step`` (0-based) when ``clock`` seconds of the budget are spent."""
        if self.budget is None:
            return warmup_poly_lr(step, self.lr, int(self.warmup), self.steps, self.power)
        return budget_lr(step, clock / self.budget, self.lr, self.warmup, self.power)


def warmup_steps(warmup: float, steps: int) -> int:
    """--warmup as a number of steps: a value below 1 is a fraction of the run's steps."""
    if warmup < 0:
        raise TrainingSetupError(f"--warmup {warmup} is negative")
    if warmup < 1:
        return round(warmup * steps)
    if warmup != int(warmup):
        raise TrainingSetupError(f"--warmup {warmup}: a whole number of steps, or a fraction below 1")
    return int(warmup)


@dataclass
class _RunInputs:
    """Everything a run reads, checked: data, vocabulary, model config, where it resumes from."""

    dataset: ShardDataset
    eval_dataset: ShardDataset | None
    vocab_tokens: list[str]
    files: dict[str, bytes]  # written into the run directory and into every checkpoint
    objective: str
    config: BertConfig
    generator: BertConfig | None  # ELECTRA's generator
    plan: MicroBatchPlan
    resume_from: Path | None
    previous_run: str  # what an --overwrite run deletes ("" for none)
    warm_start: Path | None = None  # ELECTRA's --init-from an MLM checkpoint (its encoder, see warm_start_electra)


def _check_inputs(args: PretrainArgs, rank: int, world: int) -> _RunInputs:
    """Read and check the data, the vocabulary, the checkpoint to resume or start from and the output directory;
    any problem raises ``TrainingSetupError`` (or a shard/checkpoint error) before anything is written."""
    run_dir, data_dir = Path(args.out), Path(args.data)
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
    if args.objective == "electra" and objective != "none":
        raise TrainingSetupError(
            f"{data_dir}: --objective electra needs shards without a sentence objective (prepare-data --objective "
            f"none), but these were prepared for {objective!r}"
        )
    eval_dataset = _eval_dataset(args, vocab_tokens, objective, seq_len) if args.eval_data else None
    resume_from = _resume_point(args, run_dir)
    previous_run = _holds_a_run(run_dir) if resume_from is None else ""
    if previous_run and not args.overwrite:
        raise TrainingSetupError(
            f"--out {run_dir} already holds a run ({previous_run}); continue it with --resume auto, start over with "
            "--overwrite (which deletes it), or choose another --out"
        )
    config = _model_config(args, len(vocab_tokens), objective, seq_len)
    generator = _generator_config(args, config)
    source = resume_from or (checkpoint.resolve(args.init_from) if args.init_from else None)
    warm_start = None
    if source is not None and resume_from is None and generator is not None and _is_mlm_checkpoint(source):
        # The MLM model's options that its weights do not depend on may differ; the run keeps its own.
        _checkpoint_config(source, config, vocab_tokens, data_dir, seq_len, free=WARM_START_FREE)
        warm_start = source
    elif source is not None:
        config = _checkpoint_config(source, config, vocab_tokens, data_dir, seq_len)
        generator = _checkpoint_generator(source, generator, config)
    plan = MicroBatchPlan(
        num_samples=len(dataset),
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        seed=args.seed,
        rank=rank,
        world_size=world,
    )
    architecture = "DebertaV2ForMaskedLM" if isinstance(config, DebertaConfig) else "BertForPreTraining"
    files = {
        "config.json": config.to_json_string(architecture).encode(),
        "vocab.txt": vocab_bytes,
        "tokenizer_config.json": tokenizer_config,
    }
    if isinstance(generator, DebertaConfig):
        files["config.json"] = config.to_json_string("DebertaV2Model").encode()
        files[electra.GENERATOR_CONFIG] = generator.to_json_string("DebertaV2ForMaskedLM").encode()
    elif generator is not None:
        files["config.json"] = config.to_json_string("ElectraForPreTraining").encode()
        files[electra.GENERATOR_CONFIG] = generator.to_json_string("ElectraForMaskedLM").encode()
    return _RunInputs(
        dataset,
        eval_dataset,
        vocab_tokens,
        files,
        objective,
        config,
        generator,
        plan,
        resume_from,
        previous_run,
        warm_start,
    )


# An MLM checkpoint's config fields that an ELECTRA run started from it may set otherwise: training-time options and
# the sentence head (ELECTRA has none), none of them a shape of the encoder's weights.
WARM_START_FREE = ("hidden_dropout_prob", "attention_probs_dropout_prob", "sentence_objective")


def _is_mlm_checkpoint(source: Path) -> bool:
    return not (source / electra.GENERATOR_CONFIG).exists()


def warm_start_electra(model, source: Path) -> None:
    """ELECTRA (``model``, either kind) started from the MLM checkpoint ``source`` of its discriminator's shape:
    the discriminator's encoder and embeddings take the MLM model's encoder, and the token embeddings the two share
    take the MLM's (DeBERTa: the generator's ``E_G``, the discriminator's delta staying at zero; BERT ELECTRA: the
    one table both look up). The generator's layers and both heads keep their fresh initialisation. The MLM
    checkpoint's ZeRO partitions, if any, are consolidated first."""
    from fastbert.train.export import consolidated_state_dict

    deberta = isinstance(model, deberta_electra.DebertaElectraForPreTraining)
    prefix = "deberta." if deberta else "bert."
    state = consolidated_state_dict(source)
    encoder = {
        k[len(prefix) :]: v.float()
        for k, v in state.items()
        if k.startswith(prefix) and not k.startswith(prefix + "pooler.")
    }
    try:
        # DeBERTa's discriminator has no table of its own: the MLM's goes to the generator's E_G.
        table = encoder.pop("embeddings.word_embeddings.weight") if deberta else None
        model.discriminator.load_state_dict(encoder)
        if table is not None:
            with torch.no_grad():
                model.generator.embeddings.word_embeddings.weight.copy_(table)
    except (RuntimeError, KeyError) as e:
        raise TrainingSetupError(f"--init-from {source}: its encoder does not fit this run's discriminator: {e}") from e


def _generator_config(args: PretrainArgs, config: BertConfig) -> BertConfig | None:
    """ELECTRA's generator for the discriminator ``config`` (None for MLM), in a shape transformers' ELECTRA holds."""
    if args.objective != "electra":
        return None
    if isinstance(config, DebertaConfig):
        try:
            return deberta_electra.generator_config(config, args.generator_size, args.generator_layers)
        except ValueError as e:
            raise TrainingSetupError(f"--objective electra with --model {args.model}: {e}") from e
    size = electra.GENERATOR_SIZE if args.generator_size is None else args.generator_size
    try:
        config.to_electra_dict()  # refuses what ElectraForPreTraining cannot hold: it is what the run exports to
        return electra.generator_config(config, size, args.generator_layers)
    except ValueError as e:
        raise TrainingSetupError(f"--objective electra with --model {args.model}: {e}") from e


def _checkpoint_generator(source: Path, generator: BertConfig | None, config: BertConfig) -> BertConfig | None:
    """The generator config of the checkpoint a run resumes or starts from: the run's, or none for both."""
    path = source / electra.GENERATOR_CONFIG
    if generator is None or not path.exists():
        if generator is not None or path.exists():
            saved, run = ("electra", "mlm") if path.exists() else ("mlm", "electra")
            raise TrainingSetupError(f"{source}: a checkpoint of --objective {saved}, but this run is {run}")
        return None
    saved = read_model_config(path)
    if type(saved) is not type(generator):
        raise TrainingSetupError(f"{path}: a {type(saved).__name__} generator, but this run builds a DeBERTa one")
    diff = sorted(k for k, v in asdict(saved).items() if getattr(generator, k) != v and k != "max_position_embeddings")
    if diff:
        detail = ", ".join(f"{k}: checkpoint {getattr(saved, k)!r} vs run {getattr(generator, k)!r}" for k in diff)
        raise TrainingSetupError(f"{path}: the generator does not match this run ({detail})")
    if isinstance(saved, DebertaConfig) and not saved.position_biased_input:
        return saved
    return saved.replace(max_position_embeddings=config.max_position_embeddings)


def _eval_dataset(args: PretrainArgs, vocab_tokens: list[str], objective: str, seq_len: int) -> ShardDataset:
    eval_dataset = ShardDataset(args.eval_data, vocab_tokens=vocab_tokens, verify="full")
    if eval_dataset.meta["objective"] != objective:
        raise TrainingSetupError(
            f"--eval-data {args.eval_data}: prepared for objective {eval_dataset.meta['objective']!r}, "
            f"but {args.data} for {objective!r}"
        )
    if eval_dataset.seq_len > seq_len:
        raise TrainingSetupError(
            f"--eval-data {args.eval_data}: samples are up to {eval_dataset.seq_len} tokens, longer than the "
            f"run's sequence length {seq_len}"
        )
    return eval_dataset


def _resume_point(args: PretrainArgs, run_dir: Path) -> Path | None:
    """The checkpoint to resume: --resume PATH, or with --resume auto the run's latest (fresh only when the run
    holds no checkpoint at all: a dangling ``latest`` or a broken checkpoint is an error, never a silent restart
    that would overwrite the run's metrics and checkpoints)."""
    if args.resume == "auto":
        saved = run_dir / checkpoint.CHECKPOINTS
        if saved.is_dir() and any(saved.iterdir()):
            try:
                return checkpoint.resolve(run_dir)
            except checkpoint.CheckpointNotFound as e:
                raise TrainingSetupError(f"--resume auto: {e}; pick a checkpoint with --resume PATH") from e
        return None
    return checkpoint.resolve(args.resume) if args.resume else None


def _checkpoint_config(
    source: Path, config: BertConfig, vocab_tokens: list[str], data_dir: Path, seq_len: int, free: tuple[str, ...] = ()
) -> BertConfig:
    """The config of the checkpoint a run resumes or starts from, which must match the run's (and its vocab) except
    in the fields ``free``."""
    saved = read_model_config(source / "config.json")
    if type(saved) is not type(config):
        raise TrainingSetupError(
            f"{source}: a checkpoint of a {type(saved).__name__} model, but this run builds a {type(config).__name__}"
        )
    diff = {
        k: (v, getattr(config, k))
        for k, v in asdict(saved).items()
        if getattr(config, k) != v and k != "max_position_embeddings" and k not in free
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise TrainingSetupError(f"{source}: the model config does not match this run ({detail})")
    saved_vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if vocab_sha256(saved_vocab) != vocab_sha256(vocab_tokens):
        raise TrainingSetupError(f"{data_dir}: the data's vocabulary differs from the one of checkpoint {source}")
    if isinstance(saved, DebertaConfig) and not saved.position_biased_input:
        return saved
    return saved.replace(max_position_embeddings=max(saved.max_position_embeddings, seq_len))


def _build_engine(
    args: PretrainArgs,
    config: BertConfig,
    generator: BertConfig | None = None,
    meta: dict | None = None,
    warm_start: Path | None = None,
):
    """The model (ELECTRA's pair when a ``generator`` is given), its output biases from the shards' ``meta``
    (``--unigram-init``; a resumed run loads them later), its encoder from the MLM checkpoint ``warm_start``
    (ELECTRA), fastbert's LAMB and the DeepSpeed engine around them; returns (engine, optimizer)."""
    import deepspeed

    torch.manual_seed(args.seed)
    if isinstance(config, DebertaConfig):
        if generator is None:
            model = DebertaForPreTraining(config)
        else:
            model = deberta_electra.DebertaElectraForPreTraining(
                config, generator, args.discriminator_weight, args.sampling_temperature
            )
    elif generator is None:
        model = BertForPreTraining(config)
    else:
        model = electra.ElectraForPreTraining(config, generator, args.discriminator_weight, args.sampling_temperature)
    if args.unigram_init and meta is not None and not init_output_biases(model, meta, args.mask_rate):
        log.warning("%s: no token_counts (prepared by an older fastbert): the output bias starts at zero", args.data)
    if warm_start is not None:  # before DeepSpeed copies the weights into its optimizer's partitions
        warm_start_electra(model, warm_start)
    groups, clip = parameter_groups(model, args.weight_decay), args.grad_clip if args.grad_clip > 0 else None
    if args.optimizer == "adamw":
        optimizer = AdamW(groups, lr=args.lr, max_grad_norm=clip)
    else:
        optimizer = Lamb(
            groups,
            lr=args.lr,
            max_grad_norm=clip,
            max_trust_ratio=args.max_trust_ratio,
            layer_adaptation="all" if args.lamb_adapt_all else "decay",
        )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(args))
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
    return engine, optimizer


def _restore(engine, args: PretrainArgs, inputs: _RunInputs) -> tuple[int, float]:
    """Load the checkpoint to resume (or --init-from's weights); returns the step the run starts after and the
    seconds the run had spent by then (its clock, which a --budget schedule goes on from)."""
    start_step, start_position, elapsed = 0, 0, 0.0
    if inputs.resume_from is not None:
        state = checkpoint.load(engine, inputs.resume_from)
        start_step = int(state["step"])
        elapsed = float(state.get("elapsed", 0.0))
        start_position = inputs.plan.check_state(state["data"])
        log.info("resumed from %s at step %d", inputs.resume_from, start_step)
    elif args.init_from and inputs.warm_start is None:
        checkpoint.load(engine, checkpoint.resolve(args.init_from), load_optimizer=not args.reset_optimizer)
    if start_position != start_step * inputs.plan.accumulation:
        raise TrainingSetupError(f"checkpoint position {start_position} is not at step {start_step}'s boundary")
    return start_step, elapsed


def _loader(args: PretrainArgs, inputs: _RunInputs, start_step: int, steps: int, device: torch.device):
    """The micro-batches from ``start_step`` on, collated (and masked) in ``--loader-workers`` processes."""
    plan = inputs.plan
    return torch.utils.data.DataLoader(
        MicroBatchDataset(inputs.dataset, plan, _collator(args, inputs.dataset, inputs.vocab_tokens)),
        batch_size=None,
        num_workers=args.loader_workers,
        sampler=range(start_step * plan.accumulation, steps * plan.accumulation),
        persistent_workers=False,
        pin_memory=device.type == "cuda",
        worker_init_fn=_loader_worker_init if args.loader_workers else None,
    )


def _eval_batches(args: PretrainArgs, inputs: _RunInputs, rank: int, world: int, device: torch.device):
    if inputs.eval_dataset is None:
        return None
    collate = _collator(args, inputs.eval_dataset, inputs.vocab_tokens, MLM_PROBABILITY)
    batches = held_out_batches(inputs.eval_dataset, collate, args.micro_batch, rank, world, args.eval_samples)
    return [pin(b) for b in batches] if device.type == "cuda" else batches


def _write_run_files(args: PretrainArgs, inputs: _RunInputs) -> None:
    """Rank 0, once every input is checked: the old run goes (--overwrite), the run's files are written."""
    run_dir = Path(args.out)
    if inputs.previous_run:
        log.warning("--overwrite: deleting the run in %s (%s)", run_dir, inputs.previous_run)
        shutil.rmtree(run_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in inputs.files.items():
        write_atomic(run_dir / name, data)
    write_atomic(run_dir / "args.json", (json.dumps(asdict(args), indent=2) + "\n").encode())


def _step_row(
    step: int, values: dict, elapsed: float, lr: float, grad_norm, objective: str, discriminator_weight=None
) -> dict:
    """The metrics of an optimizer step from its summed ``values`` (timings and FLOPs are added by the caller);
    ``discriminator_weight`` is ELECTRA's lambda (None for MLM)."""
    skipped = values["skipped"] > 0
    return {
        "step": step,
        **step_metrics(values, objective != "none", discriminator_weight),
        "lr": lr,
        "grad_norm": None if skipped or grad_norm is None else float(grad_norm),
        "skipped": skipped,
        "tokens_per_s": values["tokens"] / elapsed,
        "samples_per_s": values["sequences"] / elapsed,
    }


def _mfu(
    config: BertConfig, values: dict, elapsed: float, peak: float | None, world: int, generator: BertConfig | None
) -> float | None:
    if peak is None:
        return None
    shape = dict(
        tokens=int(values["tokens"]), squared_lengths=int(values["squared_lengths"]), sequences=int(values["sequences"])
    )
    if generator is None:
        flops = training_flops(config, **shape, masked=int(values["masked"]))
    else:  # ELECTRA: the generator predicts the masked tokens; the discriminator's small head is left out
        flops = training_flops(generator, **shape, masked=int(values["masked"])) + training_flops(
            config, **shape, masked=0
        )
    return flops / elapsed / (peak * world)


def pretrain(args: PretrainArgs) -> dict:
    """Run (or resume) pretraining; returns the final metrics of rank 0, with ``stopped`` set to the signal's name
    or ``"max-minutes"`` when the run stopped (and saved) before its last step. A ``--budget`` run ends normally at
    its budget."""
    started = time.perf_counter()
    schedule = Schedule.from_args(args)
    if not 0.0 < args.mask_rate < 1.0:  # before the slow distributed start-up, as the checks below
        raise TrainingSetupError(f"--mask-rate must be in (0, 1), got {args.mask_rate}")
    if not (math.isfinite(args.sampling_temperature) and args.sampling_temperature > 0):
        raise TrainingSetupError(f"--sampling-temperature must be a positive number, got {args.sampling_temperature}")
    if args.sampling_temperature != 1.0 and args.objective != "electra":
        raise TrainingSetupError("--sampling-temperature is ELECTRA's generator's: it needs --objective electra")
    presets = [*PRESETS, *DEBERTA_PRESETS]
    if args.model not in presets and not os.path.isfile(args.model):  # before the slow distributed start-up
        raise TrainingSetupError(
            f"--model {args.model!r} is neither a preset ({', '.join(presets)}) nor a config.json file"
        )
    init_distributed(args.dist_timeout)
    set_tf32(args.tf32)
    run = _Run(args, started, schedule)
    try:
        while run.step < schedule.steps:
            values = run.train_step()
            if values["budget_spent"] > 0:
                break
            if _stop_requested(values) and run.step < schedule.steps:
                return {**run.last, "stopped": run.stopped_by(values)}
        return run.last
    finally:
        run.close()


class _Run:
    """One rank's pretraining run: its inputs, engine, data, metrics log and position, and one optimizer step at a
    time (the step, its metrics row, evaluation, the divergence check and checkpointing, in that order)."""

    def __init__(self, args: PretrainArgs, started: float, schedule: Schedule):
        self.args, self.started, self.schedule = args, started, schedule
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.inputs = _check_inputs(args, self.rank, self.world)
        self.engine, self.optimizer = _build_engine(
            args, self.inputs.config, self.inputs.generator, self.inputs.dataset.meta, self.inputs.warm_start
        )
        self.step, self.clock_offset = _restore(self.engine, args, self.inputs)
        self.batches = iter(_loader(args, self.inputs, self.step, schedule.steps, self.engine.device))
        self.eval_batches = _eval_batches(args, self.inputs, self.rank, self.world, self.engine.device)
        # A --budget run's clock: rank 0's seconds into the run (start-up and earlier processes included), shared
        # through each step's sums so that every rank takes the same rate; closing is what the end will cost (the
        # last measured evaluation and save). A budget the start-up spent stops here, before anything is written.
        self.clock = self._shared_clock()
        self.closing = {"eval": 0.0, "save": 0.0}
        if schedule.budget is not None and self.clock >= schedule.budget:
            raise TrainingSetupError(
                f"--budget {args.budget} ({schedule.budget:g} s) is spent before the first step: "
                + (
                    f"start-up took {self.clock:.1f} s"
                    if self.clock_offset == 0
                    else f"the run had used {self.clock_offset:.1f} s by its checkpoint, and start-up "
                    f"{self.clock - self.clock_offset:.1f} s more"
                )
            )
        if self.rank == 0:
            _write_run_files(args, self.inputs)
        self.peak = peak_flops(self.engine.device, args.precision, tf32=args.tf32)
        if self.peak is None and self.engine.device.type == "cuda" and self.rank == 0:
            log.warning("%s: peak FLOP/s unknown, so MFU is not logged", torch.cuda.get_device_name(self.engine.device))
        self.metrics_log = MetricsLog(
            Path(args.out),
            start_step=self.step,
            total_steps=schedule.steps,
            enabled=self.rank == 0,
            progress=args.progress,
            budget=schedule.budget,
        )
        self.stop = StopRequest("pretrain", "a checkpoint", announce=self.rank == 0)
        self.max_seconds = None if args.max_minutes is None else args.max_minutes * 60
        self.last: dict = {}
        self.skipped_in_a_row = 0
        if self.inputs.resume_from is not None:
            checkpoint.restore_rng(self.inputs.resume_from)  # last: building models and loaders draws random numbers
        self.tick = time.perf_counter()

    def train_step(self) -> dict[str, float]:
        """One optimizer step, then its row (``self.last``) logged, with a held-out evaluation and a checkpoint when
        due; returns the step's sums (``SUMS``) as every rank has them."""
        args = self.args
        step_started = time.perf_counter()
        lr = self.schedule.rate(self.step, self.clock)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        sums = optimizer_step(
            self.engine,
            [next(self.batches) for _ in range(self.inputs.plan.accumulation)],
            self.world,
            skipped=self._skipped,
            stop=self.stop.requested,
            out_of_time=lambda: self.max_seconds is not None and time.perf_counter() - self.started >= self.max_seconds,
            clock=lambda: self._elapsed() if self.rank == 0 else 0.0,
            budget_spent=lambda: self.rank == 0 and self._budget_spent(step_started),
            grad_norm=lambda: self._report()[1] if self.rank == 0 else 0.0,
        )
        values = dict(zip(SUMS, sums.tolist(), strict=True))  # the step's one read back to the host
        self.step += 1
        self.clock = values["clock"]
        self.last = self._row(values, lr)
        if self.eval_batches is not None and self._evaluating(values):
            started = time.perf_counter()
            self.last.update(evaluate(self.engine.module, self.eval_batches, self.engine.device))
            self.tick = time.perf_counter()  # the evaluation is not the next step's time
            self.closing["eval"] = self.tick - started
        self._count_skipped()
        self.metrics_log.write(self.last)
        self._check_divergence()
        if self._ending(values) or _stop_requested(values) or _every(args.save_every, self.step):
            started = time.perf_counter()
            self._save()
            self.closing["save"] = time.perf_counter() - started
        return values

    def _report(self) -> torch.Tensor:
        """The optimizer's ``[skipped, gradient norm]`` of its last step, on the device (nan before its first)."""
        report = self.optimizer.step_report()
        return report if report is not None else torch.tensor([1.0, math.nan], dtype=torch.float64)

    def _skipped(self) -> torch.Tensor | bool:
        """1 on the device if the optimizer skipped the step (non-finite gradients, decided on the device), True if
        DeepSpeed did not apply it (an fp16 overflow: its own host decision)."""
        return self._report()[0] if self.engine.was_step_applied() else True

    def _elapsed(self) -> float:
        """Seconds into the run on this rank's clock: earlier processes' share (from the checkpoint) and this one's
        since ``pretrain`` was called."""
        return self.clock_offset + time.perf_counter() - self.started

    def _shared_clock(self) -> float:
        """Rank 0's ``_elapsed()``, on every rank (one all-reduce)."""
        mine = self._elapsed() if self.rank == 0 else 0.0
        clock = torch.tensor([mine], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(clock)
        return float(clock.item())

    def _budget_spent(self, step_started: float) -> bool:
        """Rank 0, as a step ends: whether another step of this one's length and the closing evaluation and save
        would overrun the budget."""
        budget = self.schedule.budget
        if budget is None:
            return False
        now = time.perf_counter()
        return self._elapsed() + (now - step_started) + sum(self.closing.values()) >= budget

    def _ending(self, values: dict) -> bool:
        """The run's last step: its step cap, or its budget."""
        return self.step == self.schedule.steps or values["budget_spent"] > 0

    def _row(self, values: dict, lr: float) -> dict:
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        grad_norm = self.engine.get_global_grad_norm() if self.optimizer.partitioned else values["grad_norm"]
        grad_norm = grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None
        lambda_ = self.args.discriminator_weight if self.inputs.generator is not None else None
        row = _step_row(self.step, values, elapsed, lr, grad_norm, self.inputs.objective, lambda_)
        row.update(time=self.metrics_log.time_offset + (self.tick - self.started), wall=time.time())
        if self.schedule.budget is not None:
            row["clock"] = values["clock"]  # rank 0's seconds into the budget, which set the next step's rate
        if self.engine.device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        if self.args.precision == "fp16":
            row["loss_scale"] = float(self.engine.optimizer.loss_scale)
        mfu = _mfu(self.inputs.config, values, elapsed, self.peak, self.world, self.inputs.generator)
        if mfu is not None:
            row["mfu"] = mfu
        return row

    def _evaluating(self, values: dict) -> bool:
        return self._ending(values) or _stop_requested(values) or _every(self.args.eval_every, self.step)

    def _count_skipped(self) -> None:
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if self.last["skipped"] else 0
        if self.last["skipped"]:
            log.warning(
                "step %d skipped: non-finite loss or gradient (weights and optimizer state unchanged)", self.step
            )

    def _check_divergence(self) -> None:
        if self.args.max_skipped_steps and self.skipped_in_a_row >= self.args.max_skipped_steps:
            raise TrainingDivergedError(
                f"{self.skipped_in_a_row} steps in a row (up to step {self.step}) had a non-finite loss or gradient, "
                f"so nothing was learnt; stopping without saving (the weights are those of the last checkpoint, if "
                f"any; --max-skipped-steps 0 never stops)"
            )

    def _save(self) -> None:
        state = {
            "step": self.step,
            "data": self.inputs.plan.state_dict(self.step * self.inputs.plan.accumulation),
            "elapsed": self._elapsed(),
        }
        path = checkpoint.save(
            self.engine,
            Path(self.args.out),
            self.step,
            {**state, "args": asdict(self.args)},
            self.inputs.files,
            self.args.keep,
        )
        if self.rank == 0:
            log.info("saved %s", path)

    def stopped_by(self, values: dict) -> str:
        """Why a run stops before its last step. A signal on any rank wins over the time budget; ranks agree on both
        through the step's sums."""
        return "max-minutes" if values["stop"] == 0 else self.stop.signal or "a signal on another rank"

    def close(self) -> None:
        self.stop.restore()
        self.metrics_log.close()


def _stop_requested(values: dict) -> bool:
    """A signal on some rank, or the time budget spent (the step's sums carry both)."""
    return values["stop"] > 0 or values["out_of_time"] > 0


def _every(n: int, step: int) -> bool:
    return bool(n) and step % n == 0
