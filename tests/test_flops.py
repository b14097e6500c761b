"""The model-FLOPs count behind the MFU figure, checked against torch's own FLOP counter on a real step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastbert.config import BertConfig
from fastbert.model import BertForPreTraining
from fastbert.train import flops


@pytest.mark.parametrize(
    "variant", [{}, {"embedding_size": 32}, {"sentence_objective": "none"}], ids=["bert", "factorised", "mlm-only"]
)
def test_training_flops_match_torch_flop_counter(variant):
    torch.manual_seed(0)
    # With attention dropout the CPU path computes attention with two matmuls, which the counter sees (it does
    # not count CPU SDPA).
    config = BertConfig.preset("tiny", vocab_size=1000, attention_probs_dropout_prob=0.1, **variant)
    model = BertForPreTraining(config)
    batch, seq = 3, 40  # equal lengths: the counter sees padded attention, the formula real lengths
    ids = torch.randint(5, 1000, (batch, seq))
    labels = torch.full((batch, seq), -100)
    labels[:, 1::5] = ids[:, 1::5]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if config.sentence_objective != "none":
        inputs["next_sentence_label"] = torch.tensor([0, 1, 0])
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    masked = int((labels != -100).sum())
    expected = flops.training_flops(
        config, tokens=batch * seq, squared_lengths=batch * seq * seq, sequences=batch, masked=masked
    )
    # The MLM loss accumulates the decoder's weight gradient with an in-place addmm_, which the counter skips.
    uncounted = 2 * masked * config.embedding_width * config.vocab_size
    assert counter.get_total_flops() + uncounted == expected


def test_attention_flops_follow_real_lengths():
    config = BertConfig.preset("tiny")
    short = flops.forward_flops(config, tokens=20, squared_lengths=2 * 10 * 10, sequences=2, masked=0)
    long = flops.forward_flops(config, tokens=20, squared_lengths=20 * 20, sequences=2, masked=0)
    # one 20-token sequence attends over 400 pairs, two 10-token ones over 200
    assert long - short == 2 * config.num_hidden_layers * 2 * config.hidden_size * 200


@pytest.mark.parametrize(
    "name,precision,tflops",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA A10G", "fp16", 70.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.5),
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_flops_by_device_name(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = flops.peak_flops(torch.device("cuda", 0), precision)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_no_peak_on_cpu():
    assert flops.peak_flops(torch.device("cpu"), "fp32") is None
