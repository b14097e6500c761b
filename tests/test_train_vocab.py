"""``fastbert train-vocab``: a WordPiece vocabulary from text files with the tokenizers trainer, identical for the
same input (the bare trainer is not), loadable by WordPieceTokenizer, and bad input named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tokenizers")

from fastbert.data.corpus import stdlib_documents  # noqa: E402
from fastbert.tokenizer import WordPieceTokenizer  # noqa: E402
from fastbert.vocab_cli import SPECIAL_TOKENS, VocabTrainingError, train_vocab  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: stdlib docstrings as a .txt (blank lines between documents) and a .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [" ".join(d) for d in stdlib_documents(limit_bytes=300_000)]
    half = len(docs) // 2
    (root / "a.txt").write_text("\n\n".join(docs[:half]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[half:]), encoding="utf-8")
    return root


def _train_in_a_new_process(corpus, out, *extra):
    """The CLI's code path in a process of its own (the trainer's hash seeds differ per process)."""
    code = (
        "import sys; from fastbert.vocab_cli import add_parser, run; import argparse; "
        "p = argparse.ArgumentParser(); s = p.add_subparsers(); add_parser(s); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train-vocab",
            str(corpus / "a.txt"),
            str(corpus / "b.jsonl"),
            "--out",
            str(out),
            "--vocab-size",
            "2000",
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAYON_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (out / "vocab.txt").read_bytes()


def test_same_input_gives_the_identical_vocab_in_every_process(corpus, tmp_path):
    runs = [_train_in_a_new_process(corpus, tmp_path / f"run{i}") for i in range(3)]
    assert runs[0] == runs[1] == runs[2]
    tokens = runs[0].decode().splitlines()
    assert len(tokens) == 2000 and tokens[:5] == list(SPECIAL_TOKENS)
    assert any(t.startswith("##") for t in tokens) and "the" in tokens


def test_the_vocab_loads_and_round_trips_text(corpus, tmp_path):
    path = train_vocab([corpus], tmp_path / "v", vocab_size=3000, progress=False)
    assert path == tmp_path / "v" / "vocab.txt"
    config = json.loads((tmp_path / "v" / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["mask_token"] == "[MASK]"
    tok = WordPieceTokenizer.from_pretrained(tmp_path / "v")
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    text = "Return the number of items in a container, as an integer."
    ids = tok.encode(text)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # The same vocabulary read by transformers gives the same ids.
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "v"))
    assert hf(text)["input_ids"] == ids


def test_cased_keeps_case_and_accents(corpus, tmp_path):
    (tmp_path / "c.txt").write_text("Café Paris Zürich\n\n" * 20 + "\n\n".join(["the cat sat"] * 20) + "\n")
    train_vocab([tmp_path / "c.txt"], tmp_path / "v", vocab_size=200, lowercase=False, progress=False)
    tok = WordPieceTokenizer.from_pretrained(tmp_path / "v")
    assert tok.do_lower_case is False
    vocab = (tmp_path / "v" / "vocab.txt").read_text().splitlines()
    assert "Café" in vocab and "Zürich" in vocab and "café" not in vocab
    assert tok.decode(tok.encode("Café Zürich"), skip_special_tokens=True) == "Café Zürich"


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.txt: no such file, directory or matching pattern"):
        train_vocab([tmp_path / "nope.txt"], tmp_path / "v", progress=False)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(VocabTrainingError, match=r"no text in .*empty\.txt"):
        train_vocab([tmp_path / "empty.txt"], tmp_path / "v", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        train_vocab([tmp_path / "bad.jsonl"], tmp_path / "v", progress=False)
    with pytest.raises(VocabTrainingError, match="--vocab-size must be more than 5"):
        train_vocab([tmp_path / "empty.txt"], tmp_path / "v", vocab_size=3)
    assert not (tmp_path / "v").exists()  # nothing written by a failed run
