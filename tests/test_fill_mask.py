"""``fastbert fill-mask``: the top-k tokens of each [MASK] with probabilities equal to the softmax of transformers'
BertForMaskedLM logits on the same checkpoint; the table and --json outputs; and the errors (no [MASK], no model,
a checkpoint without an MLM head)."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import pytest
import torch

from fastbert import BertConfig, BertForPreTraining
from fastbert.fill_mask import FillMaskError, add_parser, fill_mask, load, run
from fastbert.tokenizer import WordPieceTokenizer


@pytest.fixture(scope="module")
def mlm_model(tmp_path_factory, minilm_dir) -> Path:
    """A random-init 2-layer BERT with an MLM head and the real bert-base-uncased vocabulary, in HF format (the
    all-MiniLM checkpoint has no MLM head). Its output bias is randomised too, so the ranking is not flat."""
    out = tmp_path_factory.mktemp("mlm")
    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    )
    with torch.no_grad():
        model.cls.bias.normal_(0, 2)
    model.save_pretrained(out)
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


def _cli(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["fill-mask", *argv])


TEXT = "The capital of France is [MASK], and its river is the [MASK]."


def test_probabilities_are_the_softmax_of_transformers_logits(mlm_model):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load(mlm_model, torch.device("cpu"))
    results = fill_mask(model, tokenizer, TEXT, top_k=7)
    assert len(results) == 2 and all(len(r) == 7 for r in results)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = transformers.BertTokenizerFast.from_pretrained(str(mlm_model))
        hf = transformers.BertForMaskedLM.from_pretrained(str(mlm_model)).eval()
    enc = hf_tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits[0].double()
    positions = (enc["input_ids"][0] == hf_tok.mask_token_id).nonzero().flatten().tolist()
    assert len(positions) == 2
    for position, candidates in zip(positions, results, strict=True):
        probs = torch.softmax(logits[position], -1)
        top = probs.topk(7)
        assert [t for t, _ in candidates] == hf_tok.convert_ids_to_tokens(top.indices.tolist())
        assert [p for _, p in candidates] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert all(a >= b for (_, a), (_, b) in zip(candidates, candidates[1:], strict=False))


def test_cli_prints_a_table_or_json(mlm_model, capsys):
    assert run(_cli(str(mlm_model), TEXT, "--top-k", "3", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    model, tokenizer = load(mlm_model, torch.device("cpu"))
    expected = fill_mask(model, tokenizer, TEXT, top_k=3)
    assert out["text"] == TEXT
    assert [[(c["token"], c["probability"]) for c in mask] for mask in out["masks"]] == [
        [(t, pytest.approx(p, abs=1e-6)) for t, p in mask] for mask in expected
    ]
    assert run(_cli(str(mlm_model), "one [MASK] here")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[MASK]:" and len(lines) == 6  # the default top 5
    token = fill_mask(model, tokenizer, "one [MASK] here")[0][0][0]
    assert lines[1].split()[1] == token and 0 < float(lines[1].split()[0]) <= 1


def test_errors_are_named(mlm_model, minilm_dir, tmp_path, capsys):
    model, tokenizer = load(mlm_model, torch.device("cpu"))
    with pytest.raises(FillMaskError, match=r"no \[MASK\] in the text: 'nothing masked'"):
        fill_mask(model, tokenizer, "nothing masked")
    with pytest.raises(FillMaskError, match=r"the text is \d+ tokens, more than the model's 512"):
        fill_mask(model, tokenizer, "word " * 600 + "[MASK]")
    with pytest.raises(FillMaskError, match=r"no-model: no such model directory"):
        load(tmp_path / "no-model")
    with pytest.raises(FillMaskError, match=r"not a model directory \(no config\.json\)"):
        load(tmp_path)
    # all-MiniLM-L6-v2 is a sentence-embedding checkpoint: no MLM head to fill a mask with.
    with pytest.raises(FillMaskError, match=r"has no MLM head \(missing cls\.bias, cls\.transform"):
        load(minilm_dir)
    assert run(_cli(str(tmp_path / "no-model"), "a [MASK]")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastbert fill-mask: error: {tmp_path / 'no-model'}: no such model directory"]


def test_a_deberta_checkpoint_fills_masks_as_transformers_does(minilm_dir, tmp_path):
    """A DeBERTa-v3 directory (``model_type`` deberta-v2, as the short-budget recipe's runs export): loaded by its
    config's type, its probabilities are the softmax of transformers' ``DebertaV2ForMaskedLM`` logits; the encoder
    alone is refused for its missing MLM head."""
    transformers = pytest.importorskip("transformers")
    from fastbert.deberta import DebertaConfig, DebertaForPreTraining, DebertaModel

    config = DebertaConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        position_buckets=8, max_relative_positions=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DebertaForPreTraining(config)
    with torch.no_grad():
        model.cls.bias.normal_(0, 2)
    model.save_pretrained(tmp_path / "mlm")
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path / "mlm")
    ours, tokenizer = load(tmp_path / "mlm", torch.device("cpu"))
    (candidates,) = fill_mask(ours, tokenizer, "The [MASK] of the river is long and wide.", top_k=5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DebertaV2ForMaskedLM.from_pretrained(str(tmp_path / "mlm")).eval()
    ids = tokenizer.encode("The [MASK] of the river is long and wide.")
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)].double()
    probs = torch.softmax(logits, -1)
    top = probs.topk(5)
    assert [t for t, _ in candidates] == tokenizer.convert_ids_to_tokens(top.indices.tolist())
    assert [p for _, p in candidates] == pytest.approx(top.values.tolist(), abs=1e-5)

    DebertaModel(config).save_pretrained(tmp_path / "encoder")
    WordPieceTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path / "encoder")
    with pytest.raises(FillMaskError, match="no MLM head"):
        load(tmp_path / "encoder", torch.device("cpu"))
