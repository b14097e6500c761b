"""Task files in every format are read alike and fail by name: a CSV table with quoted commas reads as its TSV
twin, and bytes that are not UTF-8 (or rows with too many fields) are reported as ``file:line`` by every reader and,
through ``fastbert finetune``, as one error line with no traceback."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastbert.tasks import formats

ROWS = [
    {"text": "plain text", "text_b": "second part", "label": "pos"},
    {"text": "commas, inside, the text", "text_b": 'and "double quotes", too', "label": "neg"},
    {"text": "a field spanning\ntwo lines", "text_b": "x", "label": "pos"},
    {"text": "café, naïve — unicode", "text_b": "é", "label": "neg"},
]


def _fields(examples):
    return [(e.text, e.pair, e.label) for e in examples]


def test_csv_with_quoted_commas_reads_like_the_tsv(tmp_path):
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "text_b", "label"])  # QUOTE_MINIMAL: quotes the comma fields
        writer.writeheader()
        writer.writerows(ROWS)
    assert '"commas, inside, the text"' in (tmp_path / "t.csv").read_text(encoding="utf-8")
    (tmp_path / "t.tsv").write_text(
        "text\ttext_b\tlabel\n"
        + "".join(f"{r['text'].replace(chr(10), ' ')}\t{r['text_b']}\t{r['label']}\n" for r in ROWS),
        encoding="utf-8",
    )

    from_csv = formats.read_text_examples(tmp_path / "t.csv", pair_column="text_b")
    from_tsv = formats.read_text_examples(tmp_path / "t.tsv", pair_column="text_b")
    assert [(t.replace("\n", " "), p, y) for t, p, y in _fields(from_csv)] == _fields(from_tsv)
    assert _fields(from_csv)[1] == ("commas, inside, the text", 'and "double quotes", too', "neg")
    assert _fields(from_csv)[2][0] == "a field spanning\ntwo lines"
    assert [e.where.rsplit(":", 1)[1] for e in from_tsv] == ["2", "3", "4", "5"]


def test_csv_byte_order_mark_is_not_part_of_the_header(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; it must not become part of the first column's name."""
    (tmp_path / "t.csv").write_bytes('text,label\n"a, b",pos\n'.encode("utf-8-sig"))
    assert _fields(formats.read_text_examples(tmp_path / "t.csv")) == [("a, b", None, "pos")]


def test_unquoted_comma_is_named_not_silently_split(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nfine,pos\nhello, world,neg\n")
    with pytest.raises(formats.TaskDataError, match=r"t\.csv:3: 3 fields but the header has 2 \(an unquoted comma"):
        formats.read_text_examples(tmp_path / "t.csv")
    bad = formats.BadRows()
    assert len(formats.read_text_examples(tmp_path / "t.csv", skip_bad_rows=True, bad=bad)) == 1
    assert len(bad.skipped) == 1


def _latin1_on_line_3(path: Path, lines: list[str]) -> Path:
    """``lines`` joined with newlines, the third holding ``caf\\xe9`` (Latin-1 for café, invalid UTF-8)."""
    data = "\n".join(lines).encode("utf-8")
    assert b"CAFE" in data.split(b"\n")[2]
    path.write_bytes(data.replace(b"CAFE", b"caf\xe9"))
    return path


SQUAD_LINES = [
    '{"data": [{"paragraphs": [{',
    '  "qas": [{"id": "q", "question": "?", "is_impossible": true}],',
    '  "context": "le CAFE"}]}]}',
]


@pytest.mark.parametrize(
    "name,lines,read",
    [
        ("t.tsv", ["text\tlabel", "fine\tpos", "un CAFE\tneg", "more\tpos"], formats.read_text_examples),
        ("t.csv", ["text,label", "fine,pos", '"un, CAFE",neg', "more,pos"], formats.read_text_examples),
        (
            "t.jsonl",
            [
                '{"text": "fine", "label": "pos"}',
                '{"text": "x", "label": "pos"}',
                '{"text": "un CAFE", "label": "neg"}',
            ],
            formats.read_text_examples,
        ),
        ("t.conll", ["EU B-ORG", "", "CAFE O", ""], formats.read_conll),
        ("t.json", SQUAD_LINES, formats.read_squad),
    ],
)
def test_non_utf8_byte_is_named_by_file_line_and_offset(tmp_path, name, lines, read):
    path = _latin1_on_line_3(tmp_path / name, lines)
    data = path.read_bytes()
    offset_in_file, offset_in_line = data.index(b"\xe9"), data.split(b"\n")[2].index(b"\xe9")
    with pytest.raises(formats.TaskDataError) as e:
        read(path)
    message = str(e.value)
    assert message.startswith(f"{path}:3: not valid UTF-8: byte 0xe9 at byte {offset_in_line} of the line"), message
    assert f"(byte {offset_in_file} of the file)" in message
    assert not isinstance(e.value, UnicodeDecodeError) and e.value.__cause__ is None


def test_finetune_cli_prints_the_bad_line_without_a_traceback(tmp_path, small_model):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("a b c", "x"), ("d e f", "y")])
    )
    bad = _latin1_on_line_3(tmp_path / "eval.csv", ["text,label", "a b c,x", "CAFE au lait,y"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastbert",
            "finetune",
            "--task",
            "classify",
            "--model",
            str(small_model),
            "--train",
            str(tmp_path / "train.jsonl"),
            "--eval",
            str(bad),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("fastbert finetune: error:")]
    assert error == [
        f"fastbert finetune: error: {bad}:3: not valid UTF-8: byte 0xe9 at byte 3 of the line "
        f"(byte 22 of the file): invalid continuation byte; re-save the file as UTF-8"
    ], result.stderr


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, minilm_dir) -> Path:
    """A random-init 1-layer BERT with the real vocabulary, saved in HF format."""
    import torch

    from fastbert import BertConfig, BertForPreTraining
    from fastbert.tokenizer import WordPieceTokenizer

    out = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    BertForPreTraining(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(out)
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


# Column counts, --labels and --min-label-count (issue 15) -------------------------------------------------------
@pytest.mark.parametrize(
    "name,content,message",
    [
        # a field missing from a column the task does not read: today silently accepted
        (
            "t.tsv",
            "text\tlabel\tid\nfine\tpos\t1\nshort row\tneg\nmore\tpos\t3\n",
            r"t\.tsv:3: 2 fields but the header has 3 \(no 'id'\)",
        ),
        (
            "t.csv",
            "text,label,id\nfine,pos,1\nshort row,neg\nmore,pos,3\n",
            r"t\.csv:3: 2 fields but the header has 3 \(no 'id'\)",
        ),
        (
            "t.tsv",
            "text\tlabel\nfine\tpos\njust text\nmore\tpos\n",
            r"t\.tsv:3: 1 field but the header has 2 \(no 'label'\)",
        ),
        ("t.tsv", "text\tlabel\nfine\tpos\nextra\tneg\tx\nmore\tpos\n", r"t\.tsv:3: 3 fields but the header has 2"),
        ("t.csv", "text,label\nfine,pos\nextra,neg,\nmore,pos\n", r"t\.csv:3: 3 fields but the header has 2"),
        (
            "t.jsonl",
            '{"text": "fine", "label": "pos"}\n{"text": "x", "label": "neg", "note": "dropped today"}\n'
            '{"text": "more", "label": "pos"}\n',
            r"t\.jsonl:2: 3 fields but the first record \(line 1\) has 2; extra 'note'",
        ),
        (
            "t.jsonl",
            '{"text": "fine", "label": "pos", "id": 1}\n\n{"text": "x", "label": "neg"}\n'
            '{"text": "more", "label": "pos", "id": 3}\n',
            r"t\.jsonl:3: 2 fields but the first record \(line 1\) has 3; missing 'id'",
        ),
    ],
)
def test_a_row_with_the_wrong_number_of_fields_is_named_or_skipped(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(formats.TaskDataError, match=message):
        formats.read_text_examples(tmp_path / name)
    bad = formats.BadRows()
    kept = formats.read_text_examples(tmp_path / name, skip_bad_rows=True, bad=bad)
    assert [e.text for e in kept] == ["fine", "more"]
    assert len(bad.skipped) == 1 and re.search(message, bad.skipped[0])


def test_label_list_from_a_comma_list_or_a_file(tmp_path):
    assert formats.parse_label_list("neg, pos ,neutral") == ["neg", "pos", "neutral"]
    (tmp_path / "labels.txt").write_text("b\na\n\nc\n")
    assert formats.parse_label_list(str(tmp_path / "labels.txt")) == ["b", "a", "c"]
    (tmp_path / "dup.txt").write_text("b\na\nb\n")
    with pytest.raises(formats.TaskDataError, match=r"dup\.txt:3: duplicate label 'b' \(first at .*dup\.txt:1\)"):
        formats.parse_label_list(str(tmp_path / "dup.txt"))
    with pytest.raises(formats.TaskDataError, match=r"--labels item 2: empty label"):
        formats.parse_label_list("a,,b")


def _table(tmp_path, name, labels):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": f"text number {i}", "label": y}) + "\n" for i, y in enumerate(labels)))
    return path


def _finetune_args(small_model, tmp_path, train, **kw):
    from fastbert.train.finetune import FinetuneArgs

    return FinetuneArgs(
        task="classify",
        model=str(small_model),
        train=str(train),
        out=str(tmp_path / "out"),
        epochs=1,
        progress=False,
        **kw,
    )


def test_labels_option_rejects_an_unknown_label_by_file_and_line(tmp_path, small_model):
    from fastbert.train.finetune import finetune

    train = _table(tmp_path, "train.jsonl", ["pos", "neg", "pos", "nge", "neg"])
    with pytest.raises(
        formats.TaskDataError, match=r"train\.jsonl:4: unknown label 'nge' \(--labels: \['pos', 'neg'\]\)"
    ):
        finetune(_finetune_args(small_model, tmp_path, train, labels="pos,neg"))
    assert not (tmp_path / "out").exists()
    evalf = _table(tmp_path, "eval.jsonl", ["pos", "neutral"])
    good = _table(tmp_path, "good.jsonl", ["pos", "neg", "pos", "neg"])
    with pytest.raises(formats.TaskDataError, match=r"eval\.jsonl:2: unknown label 'neutral' \(--labels:"):
        finetune(_finetune_args(small_model, tmp_path, good, labels="pos,neg", eval=str(evalf)))
    # A declared label set is the model's, in the given order, even with a class the training file lacks.
    (tmp_path / "labels.txt").write_text("pos\nneutral\nneg\n")
    finetune(_finetune_args(small_model, tmp_path, good, labels=str(tmp_path / "labels.txt"), eval=str(evalf)))
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "pos", "1": "neutral", "2": "neg"}


def test_a_label_seen_once_is_a_typo_not_a_class(tmp_path, small_model):
    from fastbert.train.finetune import finetune

    train = _table(tmp_path, "train.jsonl", ["pos", "neg", "pos", "neg", "postive", "pos"])
    with pytest.raises(
        formats.TaskDataError,
        match=r"train\.jsonl:5: label 'postive' appears 1 time in .*train\.jsonl, fewer than --min-label-count 2",
    ):
        finetune(_finetune_args(small_model, tmp_path, train))
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        formats.TaskDataError, match=r"train\.jsonl:2: label 'neg' appears 2 times .* --min-label-count 3"
    ):
        finetune(_finetune_args(small_model, tmp_path, train, min_label_count=3))
    skipped = finetune(_finetune_args(small_model, tmp_path, train, skip_bad_rows=True))
    assert len(skipped["skipped_rows"]) == 1 and "'postive'" in skipped["skipped_rows"][0]
    config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["neg", "pos"]
    for disabled in (0, 1):  # every label accepted
        finetune(_finetune_args(small_model, tmp_path, train, min_label_count=disabled, overwrite=True))
        config = json.loads((tmp_path / "out" / "best" / "config.json").read_text())
        assert sorted(config["id2label"].values()) == ["neg", "pos", "postive"]


def test_a_rare_ner_tag_is_named_by_its_token_line(tmp_path):
    (tmp_path / "t.conll").write_text("EU B-ORG\nrejects O\n\nGerman B-MISC\ncall O\nBonn B-LOC\n\nEU B-ORG\nsays O\n")
    examples = formats.read_conll(tmp_path / "t.conll")
    with pytest.raises(formats.TaskDataError, match=r"t\.conll:4: label 'B-MISC' appears 1 time"):
        formats.check_label_counts(examples, 2, False, formats.BadRows(), tmp_path / "t.conll")
    with pytest.raises(formats.TaskDataError, match=r"t\.conll:6: unknown label 'B-LOC'"):
        formats.check_labels(examples, ["B-ORG", "B-MISC", "O"], False, formats.BadRows())
