"""``fastbert tokenize``: ids per input line equal to HF fast's, chunk boundaries, and bad input named by file,
line and byte."""

from __future__ import annotations

import argparse

import pytest

from fastbert import tokenize_cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastbert")
    tokenize_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenize", *argv])
    return args.func(args)


@pytest.mark.parametrize("special", [False, True])
def test_ids_per_line_match_transformers(tmp_path, vocab_path, hf_tokenizer, real_sentences, special):
    lines = real_sentences + ["", "Ünïcödé 中文 😀", "  trailing spaces  \r"]
    (tmp_path / "a.txt").write_text("\n".join(lines[:10]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(lines[10:]), encoding="utf-8")  # no final newline
    out = tmp_path / "ids.txt"
    argv = [
        "--vocab",
        str(vocab_path),
        "-o",
        str(out),
        "--no-progress",
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.txt"),
    ]
    assert run(argv + (["--add-special-tokens"] if special else [])) == 0
    got = [[int(i) for i in row.split()] for row in out.read_text().split("\n")[:-1]]
    assert got == hf_tokenizer(lines, add_special_tokens=special)["input_ids"]


def test_cased_and_pretrained_directory(tmp_path, minilm_dir, vocab_path, hf_tokenizer, capsys):
    (tmp_path / "in.txt").write_text("Hello World\n")
    assert run(["--vocab", str(minilm_dir), "--no-progress", str(tmp_path / "in.txt")]) == 0
    assert (
        capsys.readouterr().out
        == " ".join(map(str, hf_tokenizer.encode("Hello World", add_special_tokens=False))) + "\n"
    )
    assert run(["--vocab", str(vocab_path), "--cased", "--no-progress", str(tmp_path / "in.txt")]) == 0
    assert capsys.readouterr().out == "100 100\n"  # capitalised words are not in an uncased vocabulary


def test_lines_across_chunk_boundaries(tmp_path):
    path = tmp_path / "long.txt"
    lines = [f"line {i} " + "x" * (i % 50) for i in range(2000)] + ["y" * 5000]
    path.write_text("\n".join(lines) + "\n")
    chunks = list(tokenize_cli.read_lines(path, chunk_bytes=1000))
    assert len(chunks) > 10
    assert [line for chunk, _ in chunks for line in chunk] == lines
    assert sum(size for _, size in chunks) == path.stat().st_size


def test_invalid_utf8_is_named(tmp_path, vocab_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbro\xc3ken here\n")
    out = tmp_path / "ids.txt"
    assert run(["--vocab", str(vocab_path), "-o", str(out), "--no-progress", str(path)]) == 1
    assert f"{path}:3: invalid UTF-8 at byte 3 of the line" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ids.txt*"))


def test_missing_inputs_are_named(tmp_path, vocab_path, capsys):
    (tmp_path / "in.txt").write_text("x\n")
    assert run(["--vocab", str(tmp_path / "nope.txt"), str(tmp_path / "in.txt")]) == 2
    assert "nope.txt: cannot open vocabulary file" in capsys.readouterr().err
    assert run(["--vocab", str(vocab_path), str(tmp_path / "missing.txt")]) == 2
    assert "no such file: " + str(tmp_path / "missing.txt") in capsys.readouterr().err
