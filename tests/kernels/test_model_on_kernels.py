"""fastbert's own model through the Triton kernels (``FASTBERT_BACKEND=triton``, interpreter; or on CUDA, both on
kernel_checks.DEVICE) against the torch references: same losses and gradients, post-LN and pre-LN, on an unpadded
batch with awkward lengths."""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from fastbert import BertConfig, BertForPreTraining
from fastbert.kernels import attention, bias_gelu, mlm_loss, residual_layer_norm


def _loss_and_grads(model, batch, backend, monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", backend)
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pre_layer_norm", [False, True])
def test_pretraining_loss_and_gradients_match_the_references(pre_layer_norm, monkeypatch):
    config = BertConfig(
        vocab_size=1100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=160,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pre_layer_norm=pre_layer_norm,
    )
    torch.manual_seed(0)
    model = BertForPreTraining(config).to(DEVICE).train()
    lengths = [1, 37, 129]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, config.vocab_size, (sum(lengths),), generator=g)
    labels = torch.where(torch.rand(sum(lengths), generator=g) < 0.2, ids, -100)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "next_sentence_label": torch.tensor([0, 1, 1]),
        "cu_seqlens": torch.tensor([0, 1, 38, 167], dtype=torch.int32),
        "max_seqlen": 129,
    }
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    ref, ref_grads = _loss_and_grads(model, batch, "torch", monkeypatch)
    calls = collections.Counter()

    def counting(op, fn):
        def counted(*args, **kwargs):
            calls[op] += 1
            return fn(*args, **kwargs)

        return counted

    for module, op in (
        (attention, "attention"),
        (residual_layer_norm, "residual_layer_norm"),
        (bias_gelu, "bias_gelu"),
        (mlm_loss, "loss_rows"),  # the MLM kernel's launcher, once per block of masked rows (ops._MLMLoss)
    ):
        monkeypatch.setattr(module, op, counting(op, getattr(module, op)))
    out, grads = _loss_and_grads(model, batch, "triton", monkeypatch)
    assert calls == {"attention": 2, "residual_layer_norm": 4, "bias_gelu": 3, "loss_rows": 1}, calls
    assert_close("mlm_loss", out.mlm_loss, ref.mlm_loss, ref.mlm_loss, ulps=64)
    assert_close("loss", out.loss, ref.loss, ref.loss, ulps=64)
    assert out.mlm_accuracy.item() == pytest.approx(ref.mlm_accuracy.item(), abs=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(name, grads[name], grad, grad, ulps=512)
