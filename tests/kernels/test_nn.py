"""fastbert.nn drop-ins: FusedLayerNorm state_dict compatibility, and patch_hf_bert on a random-init
transformers BertForMaskedLM giving the same loss and gradients, with the kernels running under the interpreter
(or on CUDA, the unpatched model there too: kernel_checks.DEVICE)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from kernel_checks import DEVICE, assert_close, to_device
from torch import nn

from fastbert import nn as fnn
from fastbert.kernels import attention, mlm_loss, residual_layer_norm

transformers = pytest.importorskip("transformers")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "triton")


def test_fused_layer_norm_is_state_dict_compatible(triton_backend):
    torch.manual_seed(0)
    norm = nn.LayerNorm(384, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = fnn.FusedLayerNorm(384, eps=1e-6)
    fused.load_state_dict(norm.state_dict())
    assert fused.state_dict().keys() == norm.state_dict().keys()
    x = torch.randn(3, 7, 384)
    assert_close("layer norm", fused.to(DEVICE)(to_device(x)), norm(x), norm(x), ulps=16)
    nn.LayerNorm(384).load_state_dict(fused.state_dict())


def _model(attn_implementation):
    config = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).to(DEVICE).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = [20, 13, 1]
    ids = torch.randint(5, 1000, (3, 20), generator=g)
    mask = (torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.where((torch.rand(3, 20, generator=g) < 0.3) & mask.bool(), ids, -100)
    labels[2, 0] = ids[2, 0]  # the one-token row has a label too
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_patch_hf_bert_keeps_loss_and_gradients(attn_implementation, triton_backend, monkeypatch):
    calls = collections.Counter()
    for function in (attention.FlashAttention, residual_layer_norm.ResidualLayerNorm):

        def counting(*args, _function=function, _apply=function.apply):
            calls[_function.__name__] += 1
            return _apply(*args)

        monkeypatch.setattr(function, "apply", counting)

    def counting_rows(*args, _rows=mlm_loss.loss_rows):
        calls["mlm_loss.loss_rows"] += 1
        return _rows(*args)

    monkeypatch.setattr(mlm_loss, "loss_rows", counting_rows)
    model = _model(attn_implementation)
    patched = fnn.patch_hf_bert(copy.deepcopy(model))
    assert sum(isinstance(m, fnn.FusedLayerNorm) for m in patched.modules()) == 2 * 2 + 2
    assert sum(isinstance(m, fnn.FusedSelfAttention) for m in patched.modules()) == 2
    assert not any(isinstance(m, nn.LayerNorm) for m in patched.modules())
    assert patched.state_dict().keys() == model.state_dict().keys()

    ids, mask, labels = _batch()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None, "with labels the fused loss never builds the logits"
    assert_close("loss", out.loss, ref.loss, ref.loss, ulps=64)
    ref.loss.backward()
    out.loss.backward()
    grads = dict(patched.named_parameters())
    for name, param in model.named_parameters():
        assert grads[name].grad is not None, f"{name} got no gradient through the patched model"
        assert_close(name, grads[name].grad, param.grad, param.grad, ulps=256)

    assert calls == {"FlashAttention": 2, "ResidualLayerNorm": 2 * 2 + 1 + 1, "mlm_loss.loss_rows": 1}, calls
    hidden_ref = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = patched.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close("last_hidden_state", hidden, hidden_ref, hidden_ref, ulps=64)


def test_key_padding_mask_reads_every_transformers_mask_form():
    keep = torch.tensor([[1, 1, 0], [1, 0, 0]])
    additive = torch.where(keep.bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(2, 1, 3, 3)
    for form in (keep, keep.bool()[:, None, None, :].expand(2, 1, 3, 3), additive):
        assert torch.equal(fnn.key_padding_mask(form), keep.bool())
    assert fnn.key_padding_mask(None) is None
