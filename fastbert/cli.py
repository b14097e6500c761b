"""The ``fastbert`` command line: one subcommand per job, each registered by an ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from fastbert import options
from fastbert.config import OBJECTIVES


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def backend_report() -> dict[str, tuple[bool, str]]:
    """Which backends are usable here, each with a one-line reason."""
    report: dict[str, tuple[bool, str]] = {}
    try:
        from fastbert import _wordpiece

        cuda = "with" if _wordpiece.with_cuda else "without"
        report["C++ tokenizer"] = (True, f"fastbert._wordpiece built {cuda} the CUDA batch kernel")
    except ImportError as e:
        report["C++ tokenizer"] = (False, f"extension not built: {e}")
    import torch

    cuda_ok = torch.cuda.is_available()
    report["CUDA"] = (cuda_ok, torch.cuda.get_device_name(0) if cuda_ok else "no CUDA device visible to torch")
    triton_version = _version("triton")
    if triton_version is None:
        report["Triton"] = (False, "triton is not installed")
    else:
        usable = cuda_ok or _interpreting()
        why = (
            "kernels run on CUDA"
            if cuda_ok
            else (
                "TRITON_INTERPRET=1: kernels run on CPU (slow)"
                if usable
                else "installed, but kernels need a CUDA device"
            )
        )
        report["Triton"] = (usable, f"triton {triton_version}: {why}")
    ds_version = _version("deepspeed")
    report["DeepSpeed"] = (
        (ds_version is not None),
        f"deepspeed {ds_version}" if ds_version else "deepspeed is not installed",
    )
    return report


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastbert

    print(f"fastbert     {fastbert.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__}")
    for dist in ("triton", "deepspeed", "numpy", "safetensors"):
        print(f"{dist:<12} {_version(dist) or 'not installed'}")
    print("\nbackends:")
    for name, (ok, why) in backend_report().items():
        print(f"  {name:<14} {'yes' if ok else 'no ':<4} {why}")
    return 0


def _rank() -> int:
    """This process's rank under a launcher (0 in a plain process)."""
    return int(os.environ.get("RANK", "0"))


def _log_setup(level: int | None = None) -> None:
    """Log lines as ``LEVEL name: message``; under a launcher only rank 0 logs below WARNING."""
    import logging

    if level is None:
        level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _prepare_data(args: argparse.Namespace) -> int:

    from fastbert.data.prepare import InputError, PrepareOptions, prepare

    _log_setup()
    options = PrepareOptions(
        vocab=args.vocab,
        do_lower_case=not args.cased,
        seq_len=args.seq_len,
        objective=args.objective,
        seed=args.seed,
        workers=args.workers,
        errors=args.errors,
        text_field=args.text_field,
        short_seq_prob=args.short_seq_prob,
        shard_size=args.shard_size,
        whole_word=args.whole_word,
    )
    try:
        meta = prepare(args.inputs, args.out, options, overwrite=args.overwrite)
    except (InputError, ValueError) as e:
        print(f"fastbert prepare-data: error: {e}", file=sys.stderr)
        return 1
    stats = meta["stats"]
    print(
        f"{meta['num_samples']} samples, {meta['num_tokens']} tokens in {len(meta['shards'])} shard(s) -> "
        f"{args.out} ({stats['documents']} documents, {stats['truncated_tokens']} tokens truncated, "
        f"{len(stats['empty_files'])} empty file(s) skipped)"
    )
    return 0


def _add_prepare_data(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="text files -> checksummed pretraining shards",
        description="Split documents into sentences, encode them with the C++ tokenizer and "
        "write segment-pair shards for pretraining.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files, directories, globs")
    p.add_argument("--vocab", required=True, help="vocab.txt")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--out", required=True, help="output directory (written whole at the end, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (its old shards are deleted)")
    p.add_argument("--seq-len", type=int, default=128, help="longest sample in tokens, [CLS] and [SEP]s included")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="nsp",
        help="sentence pairs for next-sentence prediction, sentence-order prediction, or packed text (none)",
    )
    p.add_argument("--workers", type=int, default=1, help="reader processes (output is identical for any number)")
    p.add_argument("--seed", type=int, default=0, help="seed of pairing and negative sampling")
    p.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="invalid UTF-8: fail naming the byte offset (strict) or replace and count",
    )
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet files")
    p.add_argument(
        "--short-seq-prob", type=float, default=0.1, help="share of samples cut short on purpose (as in BERT)"
    )
    p.add_argument("--shard-size", type=int, default=100_000, help="samples per shard")
    p.add_argument(
        "--whole-word",
        action="store_true",
        help="record that pretraining on these shards masks whole words (as pretrain --whole-word)",
    )
    p.set_defaults(func=_prepare_data)


def _pretrain(args: argparse.Namespace) -> int:

    from fastbert.data.sampler import PlanError
    from fastbert.data.shards import ShardError
    from fastbert.train.checkpoint import CheckpointNotFound
    from fastbert.train.pretrain import DEFAULT_STEPS, PretrainArgs, TrainingSetupError, pretrain
    from fastbert.train.stopping import INTERRUPTED_EXIT

    _log_setup()
    try:
        final = pretrain(options.from_namespace(PretrainArgs, args))
    except (TrainingSetupError, PlanError, ShardError, CheckpointNotFound) as e:
        print(f"fastbert pretrain: error: {e}", file=sys.stderr)
        return 1
    if not final:
        return 0
    say = print if _rank() == 0 else lambda *a, **k: None  # one final word per run, not one per rank
    if "mlm_accuracy" in final:
        accuracy = f"MLM accuracy {final['mlm_accuracy']:.3f}"
    else:  # ELECTRA
        accuracy = (
            f"generator accuracy {final['generator_accuracy']:.3f}, discriminator {final['discriminator_accuracy']:.3f}"
        )
    say(f"step {final['step']}: loss {final['loss']:.4f}, {accuracy}")
    stopped = final.get("stopped")
    if stopped is None:
        return 0
    resume = f"continue with: fastbert pretrain --resume auto --out {args.out} (and the same options)"
    last = args.steps if args.steps is not None or args.budget is not None else DEFAULT_STEPS
    until = f"before step {last}" if last is not None else f"at step {final['step']}, before the end of its budget"
    if stopped == "max-minutes":
        say(f"stopped at the --max-minutes {args.max_minutes:g} budget, checkpoint saved; {resume}")
        return 0
    say(
        f"fastbert pretrain: interrupted by {stopped} {until}, checkpoint saved; {resume}",
        file=sys.stderr,
    )
    return INTERRUPTED_EXIT


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain BERT on prepared shards (DeepSpeed, LAMB)",
        description="Pretrain a BERT model with DeepSpeed and fastbert's ZeRO-correct LAMB. "
        "Runs as a plain process, under torchrun or under the deepspeed "
        "launcher (use `python -m fastbert pretrain` with launchers).",
    )
    options.add_arguments_when_used(p, "fastbert.train.pretrain:PretrainArgs")
    p.set_defaults(func=_pretrain)


def _export(args: argparse.Namespace) -> int:
    from fastbert.train.checkpoint import CheckpointNotFound
    from fastbert.train.export import export

    try:
        out = export(args.source, args.out)
    except CheckpointNotFound as e:
        print(f"fastbert export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fastbert.train.plot import plot

    try:
        out = plot(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastbert plot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _finetune(args: argparse.Namespace) -> int:

    from fastbert.tasks.formats import TaskDataError
    from fastbert.train.checkpoint import CheckpointNotFound
    from fastbert.train.finetune import FinetuneArgs, finetune

    _log_setup()
    try:
        results = finetune(options.from_namespace(FinetuneArgs, args))
    except (TaskDataError, CheckpointNotFound, ValueError) as e:
        print(f"fastbert finetune: error: {e}", file=sys.stderr)
        return 1
    shown = {k: round(v, 4) for k, v in results.items() if k.startswith("eval_")}
    if _rank() == 0:
        print(f"best: {shown} -> {args.out}/eval_results.json ({len(results['skipped_rows'])} bad rows skipped)")
    return 0


def _add_finetune(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune on classification, pairs, regression, NER or QA",
        description="Add a task head to a pretrained model and fine-tune the whole model.",
    )
    options.add_arguments_when_used(p, "fastbert.train.finetune:FinetuneArgs")
    p.set_defaults(func=_finetune)


def _distill(args: argparse.Namespace) -> int:

    from fastbert.data.shards import ShardError
    from fastbert.train.distill import DistillArgs, distill

    _log_setup()
    try:
        final = distill(options.from_namespace(DistillArgs, args))
    except (ShardError, ValueError) as e:
        print(f"fastbert distill: error: {e}", file=sys.stderr)
        return 1
    print(f"step {final['step']}: loss {final['loss']:.4f} -> {args.out}")
    return 0


def _add_distill(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="a DistilBERT-style student from a teacher",
        description="Distil a teacher (HF directory) into a student with fewer layers, "
        "initialised from every other teacher layer, with DistilBERT's triple "
        "loss.",
    )
    options.add_arguments_when_used(p, "fastbert.train.distill:DistillArgs")
    p.set_defaults(func=_distill)


def _demo(args: argparse.Namespace) -> int:
    import logging

    from fastbert.demo import DemoArgs, run_demo

    _log_setup(logging.WARNING)
    run_demo(DemoArgs(out=args.out, budget=args.budget, steps=args.steps))
    return 0


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its --help shows every option's default, and options generated from a dataclass are
    added only when the subcommand is used (its module imports torch, which --help and tokenize do not need)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", options.HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        options.add_pending_arguments(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    import fastbert

    parser = argparse.ArgumentParser(prog="fastbert", description="Fast, exact BERT pretraining and fine-tuning.")
    parser.add_argument("--version", action="version", version=f"fastbert {fastbert.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    info = subparsers.add_parser(
        "info", help="versions and which backends (C++ tokenizer, Triton, CUDA, DeepSpeed) are usable"
    )
    info.set_defaults(func=_info)
    _add_prepare_data(subparsers)
    _add_pretrain(subparsers)
    _add_finetune(subparsers)
    _add_distill(subparsers)
    export = subparsers.add_parser("export", help="a run or checkpoint -> HF-format model directory")
    export.add_argument("source", metavar="RUN_DIR|CKPT")
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)
    plot = subparsers.add_parser("plot", help="training curves of a run as a PNG")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, help="default: RUN_DIR/curves.png")
    plot.set_defaults(func=_plot)
    demo = subparsers.add_parser("demo", help="the whole pipeline on the Python stdlib's docstrings, on CPU")
    demo.add_argument("--out", default="fastbert-demo", help="working directory (default: ./fastbert-demo)")
    demo.add_argument("--budget", default="4m", help="pretraining time budget (90s, 4m, 1h; default 4m)")
    demo.add_argument("--steps", type=int, default=None, help="stop pretraining after this many steps (a cap)")
    demo.set_defaults(func=_demo)
    from fastbert import fill_mask, tokenize_cli, vocab_cli

    tokenize_cli.add_parser(subparsers)
    vocab_cli.add_parser(subparsers)
    fill_mask.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = options.parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"fastbert {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # What bad input and broken files raise (a command's own errors are ValueErrors): the message, not a
        # traceback; --debug shows it.
        if args.debug:
            raise
        print(f"fastbert {args.command}: error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
