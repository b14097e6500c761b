"""The generated command-line flags: defaults, help and types come from the job's dataclass, --config files set
them (flags win), and a run's args.json reproduces its arguments."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from fastbert import options
from fastbert.cli import build_parser
from fastbert.train.distill import DistillArgs
from fastbert.train.finetune import FinetuneArgs
from fastbert.train.pretrain import PretrainArgs

COMMANDS = {
    "pretrain": (PretrainArgs, ["--data", "d", "--out", "o"]),
    "distill": (DistillArgs, ["--teacher", "t", "--data", "d", "--out", "o"]),
    "finetune": (FinetuneArgs, ["--task", "classify", "--model", "m", "--train", "t.tsv", "--out", "o"]),
}


def _parse(argv):
    return options.parse(build_parser(), argv)


@pytest.mark.parametrize("command", COMMANDS)
def test_flag_defaults_are_the_dataclass_defaults(command):
    cls, required = COMMANDS[command]
    parsed = options.from_namespace(cls, _parse([command, *required]))
    values = dict(zip(required[::2], required[1::2], strict=True))
    assert parsed == cls(**{k.lstrip("-").replace("-", "_"): v for k, v in values.items()})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command, capsys):
    cls, _ = COMMANDS[command]
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), "an option without help text"
    with pytest.raises(SystemExit):
        _parse([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is True:
            assert f"--no-{f.name.replace('_', '-')} " in text
        elif f.default not in (dataclasses.MISSING, None, False) and "default" not in f.metadata["help"]:
            assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(f.default))}\)", text), flag
    assert "--no-progress show a progress bar (on by default" in text


def test_types_and_switches(tmp_path):
    args = options.from_namespace(
        PretrainArgs,
        _parse(
            ["pretrain", "--data", "d", "--out", "o", "--lr", "2e-4", "--seq-len", "64", "--no-tf32", "--whole-word"]
        ),
    )
    assert args.lr == 2e-4 and args.seq_len == 64 and args.tf32 is False and args.whole_word is True
    assert args.progress is True and args.precision == "fp32"


def test_missing_required_option_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["pretrain", "--out", "o"])
    assert e.value.code == 2 and "required: --data" in capsys.readouterr().err


def test_config_file_sets_options_and_flags_override_it(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": "shards", "out": "run", "steps": 7, "lr": 5e-4, "whole-word": True}))
    args = options.from_namespace(PretrainArgs, _parse(["pretrain", "--config", str(config), "--steps", "9"]))
    assert (args.data, args.out, args.steps, args.lr, args.whole_word) == ("shards", "run", 9, 5e-4, True)


def test_a_command_line_switch_undoes_a_config_files_in_either_direction(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": "shards", "out": "run", "pre_ln": True, "tf32": False}))
    args = options.from_namespace(PretrainArgs, _parse(["pretrain", "--config", str(config)]))
    assert (args.pre_ln, args.tf32) == (True, False)
    args = options.from_namespace(PretrainArgs, _parse(["pretrain", "--config", str(config), "--no-pre-ln", "--tf32"]))
    assert (args.pre_ln, args.tf32) == (False, True)


def test_a_runs_args_json_reproduces_the_run(tmp_path):
    original = PretrainArgs(data="shards", out="run", steps=12, micro_batch=4, global_batch=16, tf32=False)
    saved = tmp_path / "args.json"
    saved.write_text(json.dumps(dataclasses.asdict(original)))  # what pretrain writes into its run directory
    assert options.from_namespace(PretrainArgs, _parse(["pretrain", "--config", str(saved)])) == original


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"data": "d", "out": "o", "stpes": 3}', "unknown option\\(s\\) stpes"),
        ('{"data": "d",\n "out": }', "not valid JSON \\(line 2"),
        ("[1, 2]", "expected a mapping"),
    ],
)
def test_bad_config_files_are_named(tmp_path, content, message):
    config = tmp_path / "bad.json"
    config.write_text(content)
    with pytest.raises(options.ConfigError, match=f"{config}.*{message}"):
        _parse(["pretrain", "--config", str(config)])


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(options.ConfigError, match="nope.json"):
        _parse(["pretrain", "--config", str(tmp_path / "nope.json")])


def test_a_shipped_recipe_is_a_config_by_name_and_flags_still_win(tmp_path, monkeypatch):
    from fastbert import recipes

    monkeypatch.chdir(tmp_path)  # no file called short-budget here: the shipped one is read
    recipe = json.loads(recipes.path("short-budget").read_text())
    args = options.from_namespace(
        PretrainArgs, _parse(["pretrain", "--data", "d", "--out", "o", "--config", "short-budget"])
    )
    assert {k: getattr(args, k) for k in recipe} == recipe
    assert args.model == "deberta-tiny" and not args.pre_ln and args.dropout == 0.0 and args.mask_rate == 0.3
    assert args.budget == "10m"
    flagged = _parse(
        ["pretrain", "--data", "d", "--out", "o", "--config", "short-budget", "--budget", "90s", "--lr", "1e-3"]
    )
    assert flagged.budget == "90s" and flagged.lr == 1e-3 and flagged.model == "deberta-tiny"
    on_bert = _parse(
        ["pretrain", "--data", "d", "--out", "o", "--config", "short-budget", "--model", "tiny", "--pre-ln"]
    )
    assert (on_bert.model, on_bert.pre_ln, on_bert.mask_rate) == ("tiny", True, 0.3)  # the recipe on BERT
    (tmp_path / "short-budget").write_text(json.dumps({"lr": 5e-4}))  # a file of that name wins over the recipe
    assert _parse(["pretrain", "--data", "d", "--out", "o", "--config", "short-budget"]).lr == 5e-4
    with pytest.raises(options.ConfigError, match=r"--config no-such-recipe: .*nor a shipped recipe: short-budget"):
        _parse(["pretrain", "--data", "d", "--out", "o", "--config", "no-such-recipe"])
