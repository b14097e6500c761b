"""Command-line flags generated from a job's arguments dataclass, so that each option's name, type, default, choices
and help text live in one place: the dataclass field.

A field ``name: T = field(default=..., metadata={"help": ..., "choices": ...})`` becomes ``--name`` (underscores as
dashes); a field without a default is required; a ``bool`` defaulting to False is a switch ``--name``, one defaulting to
True is ``--no-name`` (each also takes the other spelling, unlisted, to undo what a ``--config`` file sets).
``metadata["positional"]`` makes it positional (with ``nargs``). Every generated command also takes ``--config FILE``
(JSON, or YAML when PyYAML is installed) whose keys are the fields: the file sets the defaults and flags on the command
line override them, so a run directory's ``args.json`` reproduces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its command-line help (and optional ``choices``, ``metavar``, ``positional``,
    ``nargs``)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with the option's default, except where there is nothing to say (switches, no default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "default" in text:
            return text
        return super()._get_help_string(action)


class ConfigError(ValueError):
    """A --config file that cannot be read or names options the command does not have."""


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field's annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], False
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, plus ``--config``."""
    hints = typing.get_type_hints(cls)
    required = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind, _ = _scalar_type(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = meta.get("help", "")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs=meta.get("nargs"), metavar=meta.get("metavar"), help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            # Both spellings, so that a command line can undo what a --config file sets; help is shown for the one
            # that changes the default.
            no_flag = "--no-" + f.name.replace("_", "-")
            if default:
                negated = f"{help_text} (on by default; this flag turns it off)" if help_text else None
                parser.add_argument(no_flag, dest=f.name, action="store_false", help=negated)
                parser.add_argument(flag, dest=f.name, action="store_true", help=argparse.SUPPRESS)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
                parser.add_argument(no_flag, dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        if not has_default:
            required.append(f.name)
            help_text = f"{help_text} (required)".strip()
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=default if has_default else None,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            nargs=meta.get("nargs"),
            help=help_text,
        )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="JSON (or YAML) file whose keys are this command's options, e.g. a run's args.json, or a shipped recipe "
        "by name (pretrain: short-budget); flags given on the command line override it",
    )
    parser.set_defaults(_options_class=cls, _required=tuple(required))


def add_arguments_when_used(parser: argparse.ArgumentParser, target: str) -> None:
    """``add_arguments(parser, cls)`` deferred until ``parser`` parses (see ``add_pending_arguments``): ``target``
    is ``"module:Class"``, imported only then."""
    parser.set_defaults(_pending_options=target)
    parser._pending_options = target


def add_pending_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.__dict__.pop("_pending_options", None)
    if target is None:
        return
    import importlib

    module, name = target.split(":")
    add_arguments(parser, getattr(importlib.import_module(module), name))


def load_config(path: str, cls: type) -> dict:
    """The options in a --config file (or a shipped recipe named without a path, see ``fastbert.recipes``),
    checked against the fields of ``cls``."""
    from fastbert import recipes

    file = Path(path)
    if not file.exists():
        file = recipes.path(path) or file
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        shipped = f" (nor a shipped recipe: {', '.join(recipes.names())})" if not file.exists() else ""
        raise ConfigError(f"--config {path}: {e.strerror or e}{shipped}") from e
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from e
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML: {e}") from e
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; expected some of {sorted(names)}")
    return values


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with each generated command's --config applied first and required options checked
    after (so that they may come from the file)."""
    args = parser.parse_args(argv)
    cls = getattr(args, "_options_class", None)
    if cls is None:
        return args
    if args.config:  # parsed again with the file's values as defaults, so that flags still win
        _subparser_for(parser, args.command).set_defaults(**load_config(args.config, cls))
        args = parser.parse_args(argv)
    missing = [name for name in args._required if getattr(args, name, None) is None]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        _subparser_for(parser, args.command).error(f"the following arguments are required: {flags}")
    return args


def _subparser_for(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def from_namespace(cls: type, args: argparse.Namespace):
    """The dataclass ``cls`` built from the parsed namespace's fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
