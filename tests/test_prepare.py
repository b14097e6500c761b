"""prepare-data and ShardDataset on real text: determinism across workers, the pairing recipe, round trips, and
every kind of bad input named."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from pairing_reference import document_pairs, nested_lists

from fastbert import _wordpiece
from fastbert.config import OBJECTIVES
from fastbert.data.corpus import stdlib_documents
from fastbert.data.encoding import encode_documents, split_sentences
from fastbert.data.prepare import PrepareOptions, PrepareStats, prepare
from fastbert.data.readers import InputError, read_documents
from fastbert.data.shards import ShardDataset, ShardError, ShardWriter
from fastbert.tokenizer import WordPieceTokenizer


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Real English text: stdlib docstrings as .txt (blank line between documents) and .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [" ".join(paragraphs) for paragraphs in stdlib_documents(limit_bytes=120_000)]
    half = len(docs) // 2
    (root / "a.txt").write_text("\n\n".join(docs[:half]) + "\n")
    with open(root / "b.jsonl", "w") as f:
        for d in docs[half:]:
            f.write(json.dumps({"text": d}) + "\n")
    return root


def options(vocab_path, **kw) -> PrepareOptions:
    return PrepareOptions(vocab=str(vocab_path), **{"seq_len": 64, "seed": 3, **kw})


def test_output_is_identical_for_any_number_of_workers(vocab_path, tmp_path, monkeypatch):
    """Workers encode blocks of DOCUMENTS_PER_TASK documents (cut in the parent, so patching it reaches them);
    small blocks over several files, none a multiple of the block size, exercise the reassembly in order."""
    from fastbert.data import prepare as prepare_module

    docs = [" ".join(paragraphs) for paragraphs in stdlib_documents(limit_bytes=120_000)]
    inputs, sizes = tmp_path / "in", [5, 8, 2, len(docs) - 15]
    inputs.mkdir()
    for i, (start, size) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)):
        part = docs[start : start + size]
        if i % 2:
            (inputs / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        else:
            (inputs / f"{i}.txt").write_text("\n\n".join(part) + "\n")
    assert sizes[-1] >= 10

    monkeypatch.setattr(prepare_module, "DOCUMENTS_PER_TASK", 3)
    blocks_per_file: dict[int, list[int]] = {}
    concatenate = prepare_module.Documents.concatenate.__func__

    def counting(cls, parts):
        blocks_per_file.setdefault(workers, []).append(len(parts))
        return concatenate(cls, parts)

    monkeypatch.setattr(prepare_module.Documents, "concatenate", classmethod(counting))
    metas = {}
    for workers in (1, 2, 3):
        metas[workers] = prepare(
            [str(inputs)],
            tmp_path / f"w{workers}",
            options(vocab_path, shard_size=500, workers=workers),
            progress=False,
        )
    for workers in (2, 3):  # one block per 3 documents, so the larger files were encoded by several workers
        assert blocks_per_file[workers][: len(sizes)] == [-(-n // 3) for n in sizes], blocks_per_file
    assert metas[1] == metas[2] == metas[3] and len(metas[1]["shards"]) > 1
    names = sorted(f.name for f in (tmp_path / "w1").iterdir())
    assert "meta.json" in names and len(names) > 3
    for workers in (2, 3):
        assert sorted(f.name for f in (tmp_path / f"w{workers}").iterdir()) == names
        for name in names:
            assert (tmp_path / f"w{workers}" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes(), (
                workers,
                name,
            )


def _synthetic_documents(count: int, rng) -> list[list[list[int]]]:
    """Documents whose ids say where they come from: doc d, sentence s, token t -> 10000*d + 100*s + t."""
    return [
        [[10000 * d + 100 * s + t for t in range(rng.integers(3, 15))] for s in range(rng.integers(2, 12))]
        for d in range(count)
    ]


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_sentence_objective_labels(objective, vocab_path):
    docs = _synthetic_documents(300, np.random.default_rng(0))
    opts, stats = options(vocab_path, objective=objective), PrepareStats()
    pairs = [(i, p) for i in range(len(docs)) for p in document_pairs(i, docs, opts, stats)]
    positives = sum(p.label == 1 for _, p in pairs) / len(pairs)
    assert 0.44 <= positives <= 0.56, positives
    for i, p in pairs:
        a_doc, b_doc = {t // 10000 for t in p.a}, {t // 10000 for t in p.b}
        assert a_doc == {i}
        assert len(p.a) + len(p.b) <= opts.seq_len - 3
        if objective == "nsp":
            assert (b_doc == {i}) == (p.label == 1), "a negative must come from another document"
            assert len(b_doc) == 1
        else:
            assert b_doc == {i}
            assert (max(p.a) < min(p.b)) == (p.label == 1), "SOP label 0 means swapped"


@pytest.fixture(scope="module")
def encoded(corpus_dir, vocab_path):
    tok = WordPieceTokenizer.from_vocab(vocab_path)
    docs, _, _ = read_documents(corpus_dir / "a.txt")
    docs.insert(3, "\u200b\x00 \u200b")  # a document whose only sentence has no tokens at all
    return tok, docs, encode_documents(docs, tok, num_threads=2)


def test_encoded_documents_are_the_tokenizer_on_each_sentence(encoded):
    tok, docs, documents = encoded
    expected = [
        [ids for ids in (tok.encode(s, add_special_tokens=False) for s in split_sentences(d)) if ids] for d in docs
    ]
    assert nested_lists(documents) == [d for d in expected if d]
    assert len(documents) == len(docs) - 1


@pytest.mark.parametrize("objective", ["nsp", "sop", "none"])
@pytest.mark.parametrize("seq_len", [32, 128])
def test_cpp_pairs_are_the_python_recipe(encoded, objective, seq_len, vocab_path):
    _, _, documents = encoded
    lists = nested_lists(documents)
    opts, stats = options(vocab_path, objective=objective, seq_len=seq_len, seed=11), PrepareStats()
    expected = [(p.a, p.b, p.label) for i in range(len(lists)) for p in document_pairs(i, lists, opts, stats)]
    got, truncated, dropped = [], 0, 0
    for begin in range(0, len(documents), 7):  # in blocks, as prepare() calls it
        tokens, offsets, split, labels, t, d = _wordpiece.segment_pairs(
            documents.tokens,
            documents.sentence_offsets,
            documents.doc_offsets,
            begin,
            min(begin + 7, len(documents)),
            seq_len,
            objective,
            opts.short_seq_prob,
            opts.seed,
        )
        cuts = offsets[:-1] + split
        got += [
            (tokens[offsets[i] : cuts[i]].tolist(), tokens[cuts[i] : offsets[i + 1]].tolist(), int(labels[i]))
            for i in range(len(split))
        ]
        truncated, dropped = truncated + t, dropped + d
    assert len(expected) > 50 and got == expected
    assert (truncated, dropped) == (stats.truncated_tokens, stats.dropped_segments)
    if objective != "none":
        assert truncated > 0  # the truncation path was exercised


def test_segment_pairs_refuses_inconsistent_arrays():
    tokens = np.arange(10, dtype=np.int32)
    with pytest.raises(ValueError, match="sentence_offsets must increase strictly.*item 1 is empty"):
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 4, 10]), np.array([0, 3]), 0, 1, 64, "sop", 0.1, 0)
    with pytest.raises(ValueError, match="doc_offsets run past the end"):
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 10]), np.array([0, 3]), 0, 1, 64, "sop", 0.1, 0)
    with pytest.raises(ValueError, match="NSP needs at least two documents"):
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 10]), np.array([0, 2]), 0, 1, 64, "nsp", 0.1, 0)
    with pytest.raises(ValueError, match="objective must be"):
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 10]), np.array([0, 2]), 0, 1, 64, "mlm", 0.1, 0)


def test_the_pair_cutter_accepts_exactly_the_python_objectives():
    assert _wordpiece.OBJECTIVES == OBJECTIVES
    tokens = np.arange(10, dtype=np.int32)
    for objective in OBJECTIVES:
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 10]), np.array([0, 1, 2]), 0, 2, 64, objective, 0.1, 0)
    with pytest.raises(ValueError, match="objective must be one of 'nsp', 'sop', 'none', got 'NSP'"):
        _wordpiece.segment_pairs(tokens, np.array([0, 4, 10]), np.array([0, 1, 2]), 0, 2, 64, "NSP", 0.1, 0)
    with pytest.raises(ValueError, match="objective must be one of"):
        PrepareOptions(vocab="vocab.txt", objective="mlm")


def test_shard_writer_cuts_blocks_into_shards(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        (
            rng.integers(5, 900, rng.integers(1, 9)).tolist(),
            rng.integers(5, 900, rng.integers(0, 9)).tolist(),
            int(rng.integers(-1, 2)),
        )
        for _ in range(53)
    ]
    writer = ShardWriter(
        tmp_path,
        vocab_tokens=[f"t{i}" for i in range(1000)],
        special_ids={"cls": 1, "sep": 2},
        seq_len=32,
        objective="nsp",
        seed=0,
        shard_size=7,
    )
    for lo, hi in [(0, 3), (3, 4), (4, 20), (20, 20), (20, 53)]:  # blocks smaller and larger than a shard
        block = samples[lo:hi]
        writer.add_samples(
            np.array([t for a, b, _ in block for t in a + b], dtype=np.int32),
            np.cumsum([0] + [len(a) + len(b) for a, b, _ in block]),
            np.array([len(a) for a, _, _ in block]),
            np.array([lab for _, _, lab in block]),
        )
    meta = writer.close()
    assert [s["num_samples"] for s in meta["shards"]] == [7] * 7 + [4]
    data = ShardDataset(tmp_path, verify="full")
    got = [(a.tolist(), b.tolist(), label) for a, b, label in (data.segments(i) for i in range(len(data)))]
    assert got == samples


def test_round_trip_decodes_to_the_normalized_source(corpus_dir, vocab_path, hf_tokenizer, tmp_path):
    src = corpus_dir / "a.txt"
    prepare([str(src)], tmp_path / "none", options(vocab_path, objective="none", seq_len=512), progress=False)
    data = ShardDataset(tmp_path / "none")
    tok = WordPieceTokenizer.from_vocab(vocab_path)
    ids = [t for i in range(len(data)) for t in data.segments(i)[0].tolist()]
    documents = [d for d in src.read_text().split("\n\n") if d.strip()]
    expected = [t for d in documents for t in hf_tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert ids == expected
    assert tok.decode(ids[:50]) == hf_tokenizer.decode(expected[:50])
    sample = data[0]
    assert sample.input_ids[0] == tok.cls_token_id and sample.input_ids[-1] == tok.sep_token_id


def test_nsp_samples_carry_specials_and_segments(corpus_dir, vocab_path, tmp_path):
    meta = prepare([str(corpus_dir)], tmp_path / "nsp", options(vocab_path), progress=False)
    data = ShardDataset(tmp_path / "nsp", verify="full")
    assert len(data) == meta["num_samples"] > 100
    tok = WordPieceTokenizer.from_vocab(vocab_path)
    for i in range(0, len(data), 37):
        s = data[i]
        seps = np.flatnonzero(s.input_ids == tok.sep_token_id)
        assert s.input_ids[0] == tok.cls_token_id and len(seps) == 2 and seps[-1] == len(s.input_ids) - 1
        assert (s.token_type_ids == (np.arange(len(s.input_ids)) > seps[0])).all()
        assert len(s.input_ids) <= 64 and s.sentence_label in (0, 1)
    assert data.meta["vocab_sha256"] and data.meta["seq_len"] == 64 and data.meta["objective"] == "nsp"


def test_invalid_utf8_names_file_and_offset(tmp_path, vocab_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Good text here.\n\nMore text \xff\xfe in the second document.\n")
    with pytest.raises(InputError, match=r"bad\.txt: invalid UTF-8 at byte offset 27"):
        prepare([str(bad)], tmp_path / "out", options(vocab_path), progress=False)
    meta = prepare([str(bad)], tmp_path / "out", options(vocab_path, errors="replace"), progress=False)
    assert meta["stats"]["replaced_characters"] == 2


def test_empty_file_is_skipped_and_reported(corpus_dir, tmp_path, vocab_path):
    (tmp_path / "in").mkdir()
    shutil.copy(corpus_dir / "a.txt", tmp_path / "in" / "a.txt")
    (tmp_path / "in" / "empty.txt").write_text("\n  \n")
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", options(vocab_path), progress=False)
    assert meta["stats"]["empty_files"] == [str(tmp_path / "in" / "empty.txt")]


def test_bad_jsonl_names_file_and_line(tmp_path, vocab_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: no field 'text'"):
        prepare([str(path)], tmp_path / "out", options(vocab_path), progress=False)
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(InputError, match=r"x\.jsonl:2: invalid JSON"):
        prepare([str(path)], tmp_path / "out", options(vocab_path), progress=False)


def test_parquet_input(tmp_path, vocab_path, corpus_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [d for d in (corpus_dir / "a.txt").read_text().split("\n\n") if d.strip()]
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    a = prepare([str(tmp_path / "d.parquet")], tmp_path / "pq", options(vocab_path, text_field="body"), progress=False)
    b = prepare([str(tmp_path / "d.txt")], tmp_path / "txt", options(vocab_path), progress=False)
    assert a["num_tokens"] == b["num_tokens"] and a["num_samples"] == b["num_samples"]
    with pytest.raises(InputError, match=r"d\.parquet: no column 'text'"):
        prepare([str(tmp_path / "d.parquet")], tmp_path / "pq2", options(vocab_path), progress=False)


def test_missing_input_and_unknown_suffix(tmp_path, vocab_path):
    with pytest.raises(InputError, match="nope.txt: no such file"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "out", options(vocab_path), progress=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"x\.csv: unsupported input type '\.csv'"):
        prepare([str(tmp_path / "x.csv")], tmp_path / "out", options(vocab_path), progress=False)


def test_corrupt_shard_and_foreign_vocab_are_named(corpus_dir, vocab_path, tmp_path):
    prepare([str(corpus_dir / "a.txt")], tmp_path / "d", options(vocab_path, shard_size=200), progress=False)
    tokens = WordPieceTokenizer.from_vocab(vocab_path).vocab.tokens
    ShardDataset(tmp_path / "d", vocab_tokens=tokens, verify="full")
    with pytest.raises(ShardError, match="vocabulary sha256"):
        ShardDataset(tmp_path / "d", vocab_tokens=tokens[:-1] + ["[extra]"])
    victim = tmp_path / "d" / "shard-00001.tokens.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.tokens\.npy: checksum mismatch in shard shard-00001"):
        ShardDataset(tmp_path / "d", verify="full")
    lazy = ShardDataset(tmp_path / "d")  # lazy: shard 0 reads fine, shard 1 fails when touched
    lazy[0]
    with pytest.raises(ShardError, match="shard-00001"):
        lazy[len(lazy) - 1]


def test_interrupted_prepare_leaves_nothing_that_looks_complete(corpus_dir, vocab_path, tmp_path, monkeypatch):
    """Killed half-way, a fresh run leaves no --out at all, and an --overwrite run leaves the earlier shards as they
    were (the new ones are built beside them and renamed into place only when complete)."""
    from fastbert.data import shards

    first = prepare([str(corpus_dir / "a.txt")], tmp_path / "d", options(vocab_path, shard_size=200), progress=False)
    calls = {"n": 0}
    real_flush = shards.ShardWriter._flush

    def dying_flush(self):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(shards.ShardWriter, "_flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus_dir / "a.txt")], tmp_path / "fresh", options(vocab_path, shard_size=200), progress=False)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(KeyboardInterrupt):
        prepare(
            [str(corpus_dir / "a.txt")],
            tmp_path / "d",
            options(vocab_path, shard_size=100, seq_len=64),
            progress=False,
            overwrite=True,
        )
    assert ShardDataset(tmp_path / "d", verify="full").meta == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no partial directory left behind


def test_a_non_empty_out_is_refused_unless_overwrite(corpus_dir, vocab_path, tmp_path):
    big = prepare([str(corpus_dir / "a.txt")], tmp_path / "d", options(vocab_path, shard_size=100), progress=False)
    assert len(big["shards"]) > 1
    with pytest.raises(InputError, match=f"--out {tmp_path / 'd'} is not empty .*pass --overwrite"):
        prepare([str(corpus_dir / "a.txt")], tmp_path / "d", options(vocab_path), progress=False)
    small = prepare(
        [str(corpus_dir / "a.txt")],
        tmp_path / "d",
        options(vocab_path, shard_size=10**6),
        progress=False,
        overwrite=True,
    )
    assert len(small["shards"]) == 1
    names = {p.name for p in (tmp_path / "d").iterdir()}
    assert not any(n.startswith("shard-00001") for n in names), names  # no stale shard of the larger run
    assert ShardDataset(tmp_path / "d", verify="full").meta == small
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    prepare([str(corpus_dir / "a.txt")], tmp_path / "empty", options(vocab_path), progress=False)


def test_cli_prepare_data(corpus_dir, vocab_path, tmp_path):
    import subprocess

    with warnings.catch_warnings():
        result = subprocess.run(
            [
                "fastbert",
                "prepare-data",
                str(corpus_dir / "a.txt"),
                "--vocab",
                str(vocab_path),
                "--out",
                str(tmp_path / "o"),
                "--seq-len",
                "64",
                "--objective",
                "sop",
            ],
            capture_output=True,
            text=True,
        )
    assert result.returncode == 0, result.stderr
    assert "samples" in result.stdout and (tmp_path / "o" / "meta.json").exists()
    bad = subprocess.run(
        [
            "fastbert",
            "prepare-data",
            str(tmp_path / "missing.txt"),
            "--vocab",
            str(vocab_path),
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "missing.txt: no such file" in bad.stderr


def test_text_blingfire_cannot_split_is_kept_whole(monkeypatch):
    import blingfire

    assert split_sentences("One sentence. And a second one.") == ["One sentence.", "And a second one."]
    monkeypatch.setattr(blingfire, "text_to_sentences", lambda text: "")  # what it returns when it fails
    assert split_sentences("Text it failed on.") == ["Text it failed on."]
    assert split_sentences("  ") == []
