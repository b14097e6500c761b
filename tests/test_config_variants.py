"""BertConfig and the seeds' variant switches: config.json round trips, parameter counts, real sharing, errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fastbert import BertConfig, BertForPreTraining, BertModel, CheckpointError, ConfigError
from fastbert.hf import load_state_dict_into


def expected_parameters(c: BertConfig) -> int:
    """BertForPreTraining's parameter count written out from the architecture."""
    h, e, i, v = c.hidden_size, c.embedding_width, c.intermediate_size, c.vocab_size
    embeddings = (v + c.max_position_embeddings + c.type_vocab_size) * e + 2 * e
    if c.embedding_size is not None:
        embeddings += e * h + h
    layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    layers = (1 if c.share_layers else c.num_hidden_layers) * layer
    final_norm = 2 * h if c.pre_layer_norm else 0
    has_sentence = c.sentence_objective != "none"
    pooler = (h * h + h) if has_sentence else 0
    heads = (h * e + e) + 2 * e + v + ((2 * h + 2) if has_sentence else 0)
    return embeddings + layers + final_norm + pooler + heads


VARIANTS = {
    "bert": BertConfig.preset("tiny"),
    "albert": BertConfig.preset("tiny", embedding_size=128, share_layers=True, sentence_objective="sop"),
    "albert-unshared": BertConfig.preset("tiny", embedding_size=64),
    "roberta-style": BertConfig.preset("tiny", type_vocab_size=1, sentence_objective="none"),
    "distilbert-style": BertConfig.preset("tiny", num_hidden_layers=2, type_vocab_size=0, sentence_objective="none"),
    "pre-ln": BertConfig.preset("tiny", pre_layer_norm=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_matches_formula(name):
    config = VARIANTS[name]
    assert BertForPreTraining(config).num_parameters() == expected_parameters(config)


def test_albert_parameter_count_matches_transformers():
    config = VARIANTS["albert"]
    hf_config = transformers.AlbertConfig(
        **{
            k: v
            for k, v in config.to_dict().items()
            if k not in ("share_layers", "pre_layer_norm", "sentence_objective")
        }
    )
    hf = transformers.AlbertForPreTraining(hf_config)
    assert BertForPreTraining(config).num_parameters() == sum(p.numel() for p in hf.parameters())


def test_shared_layers_share_storage_and_gradients():
    """The shared layer's gradient is the sum over all the places it is applied."""
    torch.manual_seed(0)
    shared_cfg = BertConfig.preset(
        "tiny",
        num_hidden_layers=3,
        share_layers=True,
        embedding_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    shared = BertModel(shared_cfg, add_pooling_layer=False)
    assert len(shared.encoder.layers) == 1
    unshared = BertModel(shared_cfg.replace(share_layers=False), add_pooling_layer=False)
    state = shared.state_dict()
    unshared.load_state_dict(
        {k.replace("layers.0.", f"layers.{i}."): v for k, v in state.items() for i in range(3)}
        | {k: v for k, v in state.items() if "layers." not in k}
    )
    ids = torch.randint(1, shared_cfg.vocab_size, (2, 11))
    shared(ids).last_hidden_state.square().sum().backward()
    unshared(ids).last_hidden_state.square().sum().backward()
    for name, p in shared.encoder.layers[0].named_parameters():
        total = sum(unshared.encoder.layers[i].get_parameter(name).grad for i in range(3))
        torch.testing.assert_close(p.grad, total, rtol=1e-4, atol=1e-6)
    # One storage: a change through the module is what every application sees.
    assert shared.num_parameters() < unshared.num_parameters()


def test_config_json_round_trip(tmp_path):
    for config in VARIANTS.values():
        config.save_pretrained(tmp_path)
        assert BertConfig.from_pretrained(tmp_path) == config


def test_fastbert_only_variants_round_trip_and_transformers_refuses(tmp_path):
    config = VARIANTS["pre-ln"].replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "fastbert"
    loaded = BertForPreTraining.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, config.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(ids).prediction_logits, model(ids).prediction_logits, rtol=0, atol=0)
    with pytest.raises((ValueError, KeyError)):
        transformers.AutoConfig.from_pretrained(str(tmp_path))


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        BertConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_act", "swish", "hidden_act 'swish'"),
        ("num_attention_heads", 5, "divisible"),
        ("sentence_objective", "rtd", "sentence_objective"),
        ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key'"),
    ],
)
def test_bad_config_values_are_named(tmp_path, field, value, message):
    d = BertConfig.preset("tiny").to_dict() | {field: value}
    (tmp_path / "config.json").write_text(json.dumps(d, indent=2))
    with pytest.raises(ConfigError, match=message):
        BertConfig.from_pretrained(tmp_path)


def test_invalid_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json:3: invalid JSON"):
        BertConfig.from_pretrained(tmp_path)


def test_wrong_shape_checkpoint_names_key_and_loads_nothing(tmp_path):
    BertForPreTraining(BertConfig.preset("tiny", intermediate_size=512)).save_pretrained(tmp_path / "small")
    target = BertForPreTraining(BertConfig.preset("tiny"))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "small" / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight: checkpoint "
        r"shape \(512, 256\) != model shape \(1024, 256\)",
    ):
        load_state_dict_into(target, state, "bert")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(CheckpointError):
        BertForPreTraining.from_pretrained(tmp_path / "small", intermediate_size=1024)


def test_missing_and_unexpected_keys_are_reported(minilm_dir):
    with pytest.warns(UserWarning, match="missing"):
        model, info = BertForPreTraining.from_pretrained(minilm_dir, output_loading_info=True)
    assert "cls.transform.weight" in info.missing_keys and "cls.sentence.weight" in info.missing_keys
    assert not any(k.startswith("bert.encoder") for k in info.missing_keys)
    assert info.unexpected_keys == []
    _, info = BertModel.from_pretrained(minilm_dir, output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []


def test_tf_era_gamma_beta_and_pytorch_bin_load(minilm_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(minilm_dir / "model.safetensors"))
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    torch.save({"bert." + k: v for k, v in renamed.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((minilm_dir / "config.json").read_text())
    a = BertModel.from_pretrained(tmp_path)
    b = BertModel.from_pretrained(minilm_dir)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("field,limit", [("input_ids", "vocab_size"), ("token_type_ids", "type_vocab_size")])
def test_out_of_range_ids_are_named(field, limit):
    config = BertConfig.preset("tiny")
    model = BertModel(config)
    ids = torch.randint(0, 100, (2, 7))
    types = torch.zeros_like(ids)
    if field == "input_ids":
        ids[1, 4] = config.vocab_size + 3
        bad, where = config.vocab_size + 3, "1, 4"
    else:
        types[0, 2] = 2
        bad, where = 2, "0, 2"
    with pytest.raises(IndexError, match=rf"{field} holds {bad} at \({where}\), outside \[0, \d+\) \({limit}\)"):
        model(ids, token_type_ids=types)


def test_too_long_sequence_is_named():
    model = BertModel(BertConfig.preset("tiny", max_position_embeddings=16))
    with pytest.raises(IndexError, match="sequence is too long"):
        model(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "head",
    ["BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"],
)
def test_a_head_model_initialises_each_weight_once(head, monkeypatch):
    """The encoder is drawn once, by BertModel's constructor (the same weights a plain BertModel gets from the same
    seed), and the head model draws only its own modules, from the same distribution."""
    import fastbert

    config = BertConfig.preset("tiny", vocab_size=3000, initializer_range=0.05, num_labels=3)
    draws = []
    normal = torch.nn.init.normal_
    # Only init_weights' draws are counted: nn.Embedding's constructor draws its own N(0, 1) first.
    monkeypatch.setattr(
        torch.nn.init, "normal_", lambda t, *a, **k: (k.get("std") == 0.05 and draws.append(t)) or normal(t, *a, **k)
    )
    torch.manual_seed(0)
    model = getattr(fastbert, head)(config)
    assert len(draws) == len({id(t) for t in draws})  # no tensor drawn twice
    torch.manual_seed(0)
    plain = BertModel(config, add_pooling_layer=model.bert.pooler is not None)
    for (name, got), want in zip(model.bert.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    for name, p in model.named_parameters():
        if name.startswith("bert."):
            continue
        if p.dim() == 2:
            assert p.std().item() == pytest.approx(0.05, rel=0.2), name
        elif name.endswith("transform_norm.weight"):
            assert (p == 1).all(), name
        else:
            assert (p == 0).all(), name
