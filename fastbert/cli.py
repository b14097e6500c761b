"""The ``fastbert`` command line: one subcommand per job, each registered by an ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys


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
        why = "kernels run on CUDA" if cuda_ok else ("TRITON_INTERPRET=1: kernels run on CPU (slow)"
                                                    if usable else "installed, but kernels need a CUDA device")
        report["Triton"] = (usable, f"triton {triton_version}: {why}")
    ds_version = _version("deepspeed")
    report["DeepSpeed"] = ((ds_version is not None),
                           f"deepspeed {ds_version}" if ds_version else "deepspeed is not installed")
    return report


def _interpreting() -> bool:
    import os

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


def _prepare_data(args: argparse.Namespace) -> int:
    import logging

    from fastbert.data.prepare import InputError, PrepareOptions, prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = PrepareOptions(vocab=args.vocab, do_lower_case=not args.cased, seq_len=args.seq_len,
                             objective=args.objective, seed=args.seed, workers=args.workers, errors=args.errors,
                             text_field=args.text_field, short_seq_prob=args.short_seq_prob,
                             shard_size=args.shard_size)
    try:
        meta = prepare(args.inputs, args.out, options)
    except (InputError, ValueError) as e:
        print(f"fastbert prepare-data: error: {e}", file=sys.stderr)
        return 1
    stats = meta["stats"]
    print(f"{meta['num_samples']} samples, {meta['num_tokens']} tokens in {len(meta['shards'])} shard(s) -> "
          f"{args.out} ({stats['documents']} documents, {stats['truncated_tokens']} tokens truncated, "
          f"{len(stats['empty_files'])} empty file(s) skipped)")
    return 0


def _add_prepare_data(subparsers) -> None:
    p = subparsers.add_parser("prepare-data", help="text files -> checksummed pretraining shards",
                              description="Split documents into sentences, encode them with the C++ tokenizer and "
                                          "write segment-pair shards for pretraining.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl or .parquet files, directories, globs")
    p.add_argument("--vocab", required=True, help="vocab.txt")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--objective", choices=("nsp", "sop", "none"), default="nsp")
    p.add_argument("--workers", type=int, default=1, help="reader processes (output is identical for any number)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="invalid UTF-8: fail naming the byte offset (strict) or replace and count")
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet files")
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--shard-size", type=int, default=100_000, help="samples per shard")
    p.set_defaults(func=_prepare_data)


def build_parser() -> argparse.ArgumentParser:
    import fastbert

    parser = argparse.ArgumentParser(
        prog="fastbert", description="Fast, exact BERT pretraining and fine-tuning.")
    parser.add_argument("--version", action="version", version=f"fastbert {fastbert.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = subparsers.add_parser("info", help="versions and which backends (C++ tokenizer, Triton, CUDA, "
                                              "DeepSpeed) are usable")
    info.set_defaults(func=_info)
    _add_prepare_data(subparsers)
    for module in ("fastbert.tokenize_cli",):
        try:
            importlib.import_module(module).add_parser(subparsers)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
