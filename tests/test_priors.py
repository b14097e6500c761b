"""Starting from what the data says: prepare-data's token counts, the MLM output bias at their log-frequencies
(a fresh model's masked-LM loss at the unigram level, not ln 30,522 = 10.3), ELECTRA's discriminator bias at its
expected replaced share, and the masking cap that scales with --mask-rate. At the real vocabulary size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbert import BertConfig, BertForPreTraining, electra
from fastbert.data.corpus import stdlib_documents
from fastbert.data.masking import MaskingCollator
from fastbert.data.prepare import PrepareOptions, prepare
from fastbert.data.shards import ShardDataset
from fastbert.train.priors import init_output_biases, unigram_log_probs


@pytest.fixture(scope="module")
def shards(tmp_path_factory, vocab_path) -> Path:
    root = tmp_path_factory.mktemp("priors")
    docs = [" ".join(p) for p in stdlib_documents(limit_bytes=120_000)]
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    prepare(
        [str(root / "corpus.txt")],
        root / "data",
        PrepareOptions(vocab=str(vocab_path), seq_len=128, objective="none", shard_size=100),
        progress=False,
    )
    return root / "data"


def test_meta_counts_every_token_of_the_shards(shards):
    data = ShardDataset(shards)
    assert len(data.meta["shards"]) > 1  # the counts add up over shards
    counts = np.asarray(data.meta["token_counts"])
    assert counts.shape == (data.meta["vocab_size"],) == (30522,)
    special = list(data.special_ids.values())
    recount = np.zeros_like(counts)
    for i in range(len(data)):
        np.add.at(recount, np.asarray(data[i].input_ids), 1)
    recount[special] = 0  # [CLS] and [SEP] are added when a sample is read; the shards hold none
    assert np.array_equal(counts, recount)
    assert counts.sum() == data.meta["num_tokens"]
    text = (shards / "meta.json").read_text()
    counts_line = [line for line in text.splitlines() if '"token_counts"' in line]
    assert len(counts_line) == 1 and counts_line[0].rstrip(",").endswith("]")  # one line; the rest stays readable


def _batches(data: ShardDataset, collate, size: int = 32):
    for start in range(0, min(len(data), 256), size):
        indices = list(range(start, min(start + size, len(data))))
        yield collate([data[i] for i in indices], np.asarray(indices), np.zeros(len(indices), np.int64))


def test_a_fresh_model_starts_at_the_unigram_loss(shards):
    """The masked-LM loss of a fresh tiny model at the real vocabulary, with its bias from the counts, is within 0.1
    nat of the unigram count model on the same masks; at zero it is near ln 30,522."""
    data = ShardDataset(shards)
    ids = data.special_ids
    collate = MaskingCollator(30522, list(ids.values()), ids["mask"], seed=3)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=30522, sentence_objective="none")).eval()
    unigram = unigram_log_probs(data.meta["token_counts"])
    losses = {"zero": [], "prior": [], "unigram": []}
    batches = list(_batches(data, collate))
    for name in ("zero", "prior"):
        if name == "prior":
            assert init_output_biases(model, data.meta, 0.15)
        with torch.no_grad():
            for b in batches:
                out = model(
                    b["input_ids"],
                    position_ids=b["position_ids"],
                    labels=b["labels"],
                    cu_seqlens=b["cu_seqlens"],
                    max_seqlen=b["max_seqlen"],
                )
                losses[name].append(float(out.mlm_loss) * len(b["masked_labels"]))
    for b in batches:
        losses["unigram"].append(-float(unigram[b["masked_labels"]].sum()))
    masked = sum(len(b["masked_labels"]) for b in batches)
    zero, prior, count_model = (sum(v) / masked for v in losses.values())
    assert abs(zero - math.log(30522)) < 0.3
    assert count_model < 8.0  # far below uniform: the counts carry real information
    assert abs(prior - count_model) < 0.1, (prior, count_model)


def test_electra_discriminator_starts_at_its_replaced_share(shards):
    """The discriminator's bias is the logit of the share of tokens the fresh generator replaces."""
    data = ShardDataset(shards)
    ids = data.special_ids
    config = BertConfig.preset("tiny", vocab_size=30522, sentence_objective="none")
    torch.manual_seed(0)
    model = electra.ElectraForPreTraining(config, electra.generator_config(config)).eval()
    assert init_output_biases(model, data.meta, 0.15)
    collate = electra.ReplacementKeys(MaskingCollator(30522, list(ids.values()), ids["mask"], seed=4), seed=5)
    replaced = tokens = 0
    with torch.no_grad():
        for b in _batches(data, collate, 64):
            out = model(
                b["input_ids"],
                position_ids=b["position_ids"],
                labels=b["labels"],
                cu_seqlens=b["cu_seqlens"],
                max_seqlen=b["max_seqlen"],
                masked_positions=b["masked_positions"],
                replacement_keys=b["replacement_keys"],
            )
            replaced += int(out.replaced.sum())
            tokens += int(b["input_ids"].numel())
    expected = torch.sigmoid(model.discriminator_head.prediction.bias).item()
    assert replaced / tokens == pytest.approx(expected, rel=0.15), (replaced / tokens, expected)
    assert torch.equal(model.generator_head.bias, unigram_log_probs(data.meta["token_counts"]))


def test_older_shards_without_counts_leave_the_bias_at_zero(shards):
    meta = {k: v for k, v in json.loads((shards / "meta.json").read_text()).items() if k != "token_counts"}
    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=30522, sentence_objective="none"))
    assert not init_output_biases(model, meta, 0.15)
    assert not model.cls.bias.any()


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.5])
def test_the_prediction_cap_follows_the_mask_rate(shards, rate):
    data = ShardDataset(shards)
    ids = data.special_ids
    collate = MaskingCollator(30522, list(ids.values()), ids["mask"], seed=1, mlm_probability=rate)
    if rate == 0.15:
        assert collate.max_predictions_for(np.array([128, 512])).tolist() == [20, 80]  # BERT's caps
    masked = total = 0
    for b in _batches(data, collate):
        masked += len(b["masked_labels"])
        total += int(b["input_ids"].numel()) - 2 * (len(b["cu_seqlens"]) - 1)
    assert masked / total == pytest.approx(rate, abs=0.02)
