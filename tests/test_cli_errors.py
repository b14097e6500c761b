"""Bad input on the command line gets one clear line naming what is wrong, never a traceback (``--debug`` shows
it), and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ENV_CMD = [sys.executable, "-m", "fastbert"]


def _fails_cleanly(args: list[str], *expected: str) -> str:
    result = subprocess.run([*ENV_CMD, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_unknown_model_preset_lists_the_presets(tmp_path):
    _fails_cleanly(
        ["pretrain", "--model", "Tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
        "'Tiny'",
        "tiny, mini, base, large",
    )


def test_tokenize_into_a_missing_directory_names_it(tmp_path, vocab_path):
    text = tmp_path / "in.txt"
    text.write_text("hello world\n")
    out = tmp_path / "nodir" / "ids.txt"
    stderr = _fails_cleanly(["tokenize", "--vocab", str(vocab_path), str(text), "-o", str(out)], str(out.parent))
    assert ".tmp" not in stderr  # no temporary name the user never gave


def test_corrupt_meta_json_is_named(tmp_path, vocab_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "vocab.txt").write_bytes(Path(vocab_path).read_bytes())
    (data / "meta.json").write_text("{oops")
    _fails_cleanly(
        ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"], str(data / "meta.json")
    )


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import pytest

    from fastbert import cli

    def broken(args):
        raise RuntimeError("the zip archive is truncated")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=broken)  # every subcommand's handler, for this parser
    for sub in parser._subparsers._group_actions[0].choices.values():
        sub.set_defaults(func=broken)
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err.strip() == (
        "fastbert info: error: RuntimeError: the zip archive is truncated (--debug shows the traceback)"
    )
    with pytest.raises(RuntimeError, match="truncated"):
        cli.main(["--debug", "info"])


def test_bad_budgets_and_mask_rates_are_named_before_anything_starts(tmp_path):
    base = ["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    _fails_cleanly([*base, "--budget", "10 days"], "--budget: budget '10 days': unknown unit 'days'")
    _fails_cleanly([*base, "--budget=-1m"], "must be a positive duration")
    _fails_cleanly([*base, "--mask-rate", "1.5"], "--mask-rate must be in (0, 1), got 1.5")
    _fails_cleanly([*base, "--sampling-temperature", "0"], "--sampling-temperature must be a positive number, got 0")
    _fails_cleanly([*base, "--sampling-temperature", "2"], "it needs --objective electra")
    assert not (tmp_path / "run").exists()
