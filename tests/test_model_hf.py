"""The model against transformers: real checkpoint parity, save/load both ways, gradients, heads, layouts."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

from fastbert import (
    BertConfig,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    CheckpointError,
)
from fastbert.hf import checkpoint_key_map

torch.manual_seed(0)


def _hf_load(cls, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(path)).eval()


def test_minilm_matches_transformers_padded_and_unpadded(minilm_dir, hf_tokenizer, real_sentences):
    ours = BertModel.from_pretrained(minilm_dir).eval()
    hf = _hf_load(transformers.BertModel, minilm_dir)
    batch = hf_tokenizer(real_sentences[:6], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    assert mask.sum(1).unique().numel() > 1, "the batch must mix sequence lengths"
    with torch.no_grad():
        ref = hf(**batch)
        padded = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        lengths = mask.sum(1)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
        unpadded = ours(batch["input_ids"][mask], token_type_ids=batch["token_type_ids"][mask], cu_seqlens=cu)
    assert (padded.last_hidden_state - ref.last_hidden_state)[mask].abs().max() <= 1e-5
    assert (padded.last_hidden_state[~mask] == 0).all()
    assert (unpadded.last_hidden_state - ref.last_hidden_state[mask]).abs().max() <= 1e-5
    assert (padded.pooler_output - ref.pooler_output).abs().max() <= 1e-5
    assert (unpadded.pooler_output - ref.pooler_output).abs().max() <= 1e-5


def _pretraining_batch(config: BertConfig, hf_tokenizer, sentences, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = hf_tokenizer(
        sentences[:4], sentences[4:8], padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    special = torch.isin(ids, torch.tensor([0, 101, 102]))
    chosen = (torch.rand(ids.shape, generator=g) < 0.15) & mask & ~special
    chosen[:, 1] = True  # every row has at least one prediction
    labels = torch.where(chosen, ids, -100)
    inputs = torch.where(chosen, torch.tensor(103), ids)  # [MASK]
    return dict(
        input_ids=inputs,
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        labels=labels,
        next_sentence_label=torch.tensor([0, 1, 1, 0]),
    )


TINY = BertConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ALBERT = BertConfig.preset(
    "tiny",
    embedding_size=64,
    share_layers=True,
    sentence_objective="sop",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
HF_PRETRAINING = {"bert": transformers.BertForPreTraining, "albert": transformers.AlbertForPreTraining}


def _compare_pretraining(ours, hf, batch, model_type):
    ours.zero_grad()
    hf.zero_grad()
    out = ours(**batch)
    ref = hf(
        **{k: v for k, v in batch.items() if k != "next_sentence_label"},
        **{"next_sentence_label" if model_type == "bert" else "sentence_order_label": batch["next_sentence_label"]},
    )
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    out.loss.backward()
    ref.loss.backward()
    with torch.no_grad():
        logits = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    masked = batch["labels"] != -100
    assert (logits.prediction_logits[masked] - ref.prediction_logits[masked]).abs().max() <= 1e-5
    hf_sentence = ref.seq_relationship_logits if model_type == "bert" else ref.sop_logits
    assert (logits.seq_relationship_logits - hf_sentence).abs().max() <= 1e-5
    hf_params = dict(hf.named_parameters())
    compared = 0
    for key, names in checkpoint_key_map(ours, model_type).items():
        ours_grad = ours.get_parameter(key).grad
        ref_grad = torch.cat([hf_params[n].grad for n in names])
        assert (ours_grad - ref_grad).abs().max() <= 1e-4, key
        compared += 1
    assert compared == len(list(ours.parameters()))


@pytest.mark.parametrize("config", [TINY, ALBERT], ids=["bert-tiny", "albert-style"])
def test_pretraining_roundtrip_through_transformers(config, tmp_path, hf_tokenizer, real_sentences):
    model_type = config.hf_model_type
    batch = _pretraining_batch(config, hf_tokenizer, real_sentences)

    ours = BertForPreTraining(config)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == model_type
    hf = _hf_load(HF_PRETRAINING[model_type], tmp_path / "ours")
    hf.train()  # dropout is 0; train mode for parity of everything else
    ours.train()
    _compare_pretraining(ours, hf, batch, model_type)

    hf_cfg_cls = transformers.BertConfig if model_type == "bert" else transformers.AlbertConfig
    hf_config = hf_cfg_cls(
        **{
            k: v
            for k, v in config.to_dict().items()
            if k not in ("share_layers", "pre_layer_norm", "sentence_objective")
        }
    )
    torch.manual_seed(1)
    fresh = HF_PRETRAINING[model_type](hf_config)
    fresh.save_pretrained(str(tmp_path / "hf"))
    loaded, info = BertForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []
    fresh.train()
    loaded.train()
    _compare_pretraining(loaded, fresh, batch, model_type)


HEADS = [
    (BertForSequenceClassification, transformers.BertForSequenceClassification, 3),
    (BertForSequenceClassification, transformers.BertForSequenceClassification, 1),
    (BertForTokenClassification, transformers.BertForTokenClassification, 5),
    (BertForQuestionAnswering, transformers.BertForQuestionAnswering, 2),
]


@pytest.mark.parametrize("ours_cls,hf_cls,num_labels", HEADS, ids=["classify", "regress", "ner", "qa"])
def test_task_heads_match_transformers(
    ours_cls, hf_cls, num_labels, minilm_dir, hf_tokenizer, real_sentences, tmp_path
):
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_cls.from_pretrained(str(minilm_dir), num_labels=num_labels).eval()
    hf.save_pretrained(str(tmp_path))
    ours = ours_cls.from_pretrained(tmp_path).eval()
    batch = hf_tokenizer(real_sentences[:5], padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    b, s = mask.shape
    if ours_cls is BertForSequenceClassification:
        labels = torch.randn(b) if num_labels == 1 else torch.randint(0, num_labels, (b,))
        extra = dict(labels=labels)
    elif ours_cls is BertForTokenClassification:
        extra = dict(labels=torch.where(mask, torch.randint(0, num_labels, (b, s)), -100))
    else:
        lengths = mask.sum(1)
        extra = dict(start_positions=lengths // 3, end_positions=lengths // 2)
    out, ref = ours(**batch, **extra), hf(**batch, **extra)
    if ours_cls is BertForQuestionAnswering:
        # Our span logits exclude padding, so the reference is HF on each sequence alone, without padding.
        alone = [
            hf(
                **{k: v[i : i + 1, : int(mask[i].sum())] for k, v in batch.items()},
                **{k: v[i : i + 1] for k, v in extra.items()},
            ).loss
            for i in range(b)
        ]
        assert abs(out.loss.item() - torch.stack(alone).mean().item()) <= 1e-5
    else:
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    if ours_cls is BertForQuestionAnswering:
        assert (out.start_logits - ref.start_logits)[mask].abs().max() <= 1e-5
        assert (out.end_logits - ref.end_logits)[mask].abs().max() <= 1e-5
        assert (out.start_logits[~mask] < -1e30).all()
    elif ours_cls is BertForTokenClassification:
        assert (out.logits - ref.logits)[mask].abs().max() <= 1e-5
    else:
        assert (out.logits - ref.logits).abs().max() <= 1e-5


def test_unpadded_layout_gives_the_same_losses(hf_tokenizer, real_sentences):
    model = BertForPreTraining(TINY).eval()
    batch = _pretraining_batch(TINY, hf_tokenizer, real_sentences)
    mask = batch["attention_mask"].bool()
    cu = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0))
    padded = model(**batch)
    flat = model(
        batch["input_ids"][mask],
        token_type_ids=batch["token_type_ids"][mask],
        labels=batch["labels"][mask],
        next_sentence_label=batch["next_sentence_label"],
        cu_seqlens=cu,
    )
    assert abs(padded.loss.item() - flat.loss.item()) <= 1e-6
    assert abs(padded.mlm_accuracy.item() - flat.mlm_accuracy.item()) == 0


def test_padding_never_reaches_the_encoder_and_mlm_sees_only_masked_rows(monkeypatch, hf_tokenizer, real_sentences):
    from fastbert import ops

    model = BertForPreTraining(TINY)
    batch = _pretraining_batch(TINY, hf_tokenizer, real_sentences)
    seen = {}
    real_attention, real_loss = ops.attention, ops.mlm_loss

    def attention(q, *args, **kwargs):
        seen["tokens"] = q.shape[0]
        return real_attention(q, *args, **kwargs)

    def mlm_loss(hidden, weight, bias, labels):
        seen["rows"] = hidden.shape[0]
        return real_loss(hidden, weight, bias, labels)

    monkeypatch.setattr(ops, "attention", attention)
    monkeypatch.setattr(ops, "mlm_loss", mlm_loss)
    model(**batch)
    assert seen["tokens"] == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    assert seen["rows"] == int((batch["labels"] != -100).sum())


def test_left_padding_matches_transformers(minilm_dir, hf_tokenizer, real_sentences):
    ours = BertModel.from_pretrained(minilm_dir).eval()
    hf = _hf_load(transformers.BertModel, minilm_dir)
    hf_tokenizer.padding_side = "left"
    try:
        batch = hf_tokenizer(real_sentences[:3], padding=True, return_tensors="pt")
    finally:
        hf_tokenizer.padding_side = "right"
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = ours(**batch).last_hidden_state - hf(**batch).last_hidden_state
    assert diff[mask].abs().max() <= 1e-5


def test_a_module_without_a_checkpoint_name_is_named():
    model = BertForSequenceClassification(BertConfig.preset("tiny", vocab_size=100, num_labels=2))
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="key 'extra.weight': module 'head:extra' has no bert checkpoint name"):
        checkpoint_key_map(model, "bert")


PRE_LN = BertConfig.preset(
    "tiny",
    num_hidden_layers=2,
    pre_layer_norm=True,
    sentence_objective="none",
    max_position_embeddings=160,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def test_pre_ln_exports_as_roberta_prelayernorm_with_the_same_logits(tmp_path, hf_tokenizer, real_sentences):
    """A pre-LN MLM model (random weights, LayerNorms and biases moved off their init) saves as transformers'
    RobertaPreLayerNormForMaskedLM, whose logits equal ours to 1e-5 on a padded batch of mixed lengths up to the
    full position table; it loads back into fastbert unchanged."""
    torch.manual_seed(0)
    ours = BertForPreTraining(PRE_LN).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)  # nothing at its init value, so every mapping shows
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == "roberta-prelayernorm" and saved["max_position_embeddings"] == 161
    assert saved["architectures"] == ["RobertaPreLayerNormForMaskedLM"]
    hf = _hf_load(transformers.RobertaPreLayerNormForMaskedLM, tmp_path / "ours")
    texts = [" ".join(real_sentences[i : i + 6]) for i in range(0, 12, 3)] + ["a short one."]
    batch = hf_tokenizer(texts, padding=True, truncation=True, max_length=160, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    assert mask.sum(1).max() == 160 and mask.sum(1).min() < 20  # the full table and heavy padding
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = ours(batch["input_ids"], batch["attention_mask"]).prediction_logits
    assert (logits - ref)[mask].abs().max() <= 1e-5

    loaded, info = BertForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert loaded.config.pre_layer_norm and loaded.config.max_position_embeddings == 160
    for (name, a), b in zip(ours.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(sentence_objective="nsp"), "sentence_objective='nsp'"),
        (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
        (dict(share_layers=True), "share_layers=True"),
    ],
)
def test_pre_ln_that_roberta_cannot_hold_stays_fastbert_and_says_why(change, reason):
    config = PRE_LN.replace(**change)
    assert config.hf_model_type == "fastbert" and reason in config.prelayernorm_obstacle
    assert BertForSequenceClassification(PRE_LN.replace(num_labels=3)).config.hf_model_type == "roberta-prelayernorm"
    from fastbert.hf import export_model_type

    assert export_model_type(BertForSequenceClassification(PRE_LN.replace(num_labels=3))) == "fastbert"
