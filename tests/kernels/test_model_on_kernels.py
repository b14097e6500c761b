"""fastbert's own models through the Triton kernels (``FASTBERT_BACKEND=triton``, interpreter; or on CUDA, both on
kernel_checks.DEVICE) against the torch references: same losses and gradients; BERT post-LN and pre-LN on an
unpadded batch with awkward lengths, DeBERTa on a padded one with shared and separate position projections."""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_checks import DEVICE, assert_close

from fastbert import BertConfig, BertForPreTraining, DebertaConfig, DebertaForMaskedLM
from fastbert.kernels import attention, bias_gelu, disentangled_attention, mlm_loss, residual_layer_norm


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


@pytest.mark.parametrize("share_att_key", [True, False], ids=["shared", "separate"])
def test_deberta_mlm_loss_and_gradients_match_the_reference(share_att_key, monkeypatch):
    """DeBERTa through ``ops.disentangled_attention``: the kernel (interpreted, or on CUDA) against the plain-PyTorch
    reference, right-padded batch, sequences past the log buckets and the clamp (8 buckets over 32 positions)."""
    config = DebertaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        position_buckets=8,
        max_relative_positions=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        share_att_key=share_att_key,
        pos_att_type=("c2p", "p2c"),
    )
    torch.manual_seed(0)
    model = DebertaForMaskedLM(config).to(DEVICE).train()
    g = torch.Generator().manual_seed(4)
    lengths, seq = torch.tensor([40, 23]), 40
    ids = torch.randint(5, config.vocab_size, (2, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = torch.where((torch.rand(2, seq, generator=g) < 0.3) & mask.bool(), ids, -100)
    batch = {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "labels": labels.to(DEVICE)}
    ref, ref_grads = _loss_and_grads(model, batch, "torch", monkeypatch)
    calls = collections.Counter()
    real = disentangled_attention.disentangled_attention_padded

    def counted(*args, **kwargs):
        calls["disentangled_attention"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(disentangled_attention, "disentangled_attention_padded", counted)
    monkeypatch.setattr(
        disentangled_attention, "relative_index", lambda *a, **k: pytest.fail("the kernel path built [seq, seq] rows")
    )
    out, grads = _loss_and_grads(model, batch, "triton", monkeypatch)
    assert calls == {"disentangled_attention": 2}, calls
    assert_close("loss", out.loss, ref.loss, ref.loss, ulps=64)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close(name, grads[name], grad, grad, ulps=512)
