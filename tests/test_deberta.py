"""DeBERTa-v3 against transformers' DebertaV2: relative-position buckets, hidden states and MLM logits with weights
moved both ways, every attention-term and key-sharing variant, padded batches, and the inputs it refuses."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta  # noqa: E402

from fastbert import CheckpointError, ConfigError, DebertaConfig, DebertaForMaskedLM, DebertaModel  # noqa: E402
from fastbert.deberta import checkpoint_key_map  # noqa: E402
from fastbert.kernels import disentangled_attention as dsa  # noqa: E402

TOL = 1e-5
# Small enough to run in a moment, with few buckets (8: exact up to distance 4, log-spaced to 31, clamped beyond) so
# that sequences of 40-64 tokens cross every bucket boundary.
SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    position_buckets=8,
    max_relative_positions=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
VARIANTS = {
    "c2p+p2c-shared": dict(pos_att_type=("c2p", "p2c"), share_att_key=True),
    "c2p+p2c-separate": dict(pos_att_type=("c2p", "p2c"), share_att_key=False),
    "c2p-shared": dict(pos_att_type=("c2p",), share_att_key=True),
    "c2p-separate": dict(pos_att_type=("c2p",), share_att_key=False),
    "p2c-shared": dict(pos_att_type=("p2c",), share_att_key=True),
    "p2c-separate": dict(pos_att_type=("p2c",), share_att_key=False),
    # DeBERTa-v2's other switches: absolute positions, segments, raw (unbucketed) distances, no table LayerNorm.
    "absolute-segments-raw": dict(
        position_biased_input=True,
        type_vocab_size=2,
        position_buckets=-1,
        max_relative_positions=16,
        norm_rel_ebd="none",
    ),
}


def _config(name: str) -> DebertaConfig:
    return DebertaConfig(**{**SMALL, **VARIANTS[name]})


def _hf_config(config: DebertaConfig, legacy: bool = False):
    d = config.to_dict()
    d.pop("model_type")
    d["legacy"] = legacy
    return transformers.DebertaV2Config(**d)


def _hf_load(cls, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert info["missing_keys"] in ([], set()), info
    return model.eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn at random (biases, LayerNorms and the MLM bias too), so that no weight hides behind
    its initial value of zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower():
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def _batches(config: DebertaConfig):
    """(input_ids, attention_mask, token_type_ids) triples: full rows of 64, 40 and 3 tokens, and a padded batch."""
    g = torch.Generator().manual_seed(7)
    out = []
    for length in (64, 40, 3):
        ids = torch.randint(1, config.vocab_size, (2, length), generator=g)
        out.append((ids, torch.ones_like(ids), None))
    lengths = torch.tensor([48, 41, 5, 1])
    ids = torch.randint(1, config.vocab_size, (4, 48), generator=g)
    mask = (torch.arange(48)[None, :] < lengths[:, None]).long()
    out.append((ids * mask, mask, None))
    if config.type_vocab_size:
        out = [
            (ids, mask, (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids)) for ids, mask, _ in out
        ]
    return out


def _compare(ours: torch.nn.Module, hf: torch.nn.Module, config: DebertaConfig) -> None:
    ours.eval()
    hf.eval()
    for ids, mask, types in _batches(config):
        kwargs = {} if types is None else {"token_type_ids": types}
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, **kwargs)
            out = ours(ids, mask, **kwargs)
        real = mask.bool()
        if isinstance(ours, DebertaModel):
            got, want = out.last_hidden_state, ref.last_hidden_state
        else:
            got, want = out.logits, ref.logits
        assert (got - want)[real].abs().max() <= TOL, f"length {ids.shape[1]}"
        assert (got[~real] == 0).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_checkpoints_load_and_match(variant, tmp_path):
    config = _config(variant)
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForMaskedLM(_hf_config(config, legacy=False))
    _randomize(hf, 1)
    hf.save_pretrained(str(tmp_path / "mlm"))
    hf.deberta.save_pretrained(str(tmp_path / "encoder"))

    ours, info = DebertaForMaskedLM.from_pretrained(tmp_path / "mlm", output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert ours.config == config
    _compare(ours, hf, config)
    encoder, info = DebertaModel.from_pretrained(tmp_path / "encoder", output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []
    _compare(encoder, hf.deberta, config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_checkpoints_load_in_transformers_and_match(variant, tmp_path):
    config = _config(variant)
    torch.manual_seed(0)
    ours = DebertaForMaskedLM(config)
    _randomize(ours, 2)
    ours.save_pretrained(tmp_path / "mlm")
    ours.deberta.save_pretrained(tmp_path / "encoder")
    saved = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert saved["model_type"] == "deberta-v2" and saved["architectures"] == ["DebertaV2ForMaskedLM"]
    _compare(ours, _hf_load(transformers.DebertaV2ForMaskedLM, tmp_path / "mlm"), config)
    _compare(ours.deberta, _hf_load(transformers.DebertaV2Model, tmp_path / "encoder"), config)
    again = DebertaForMaskedLM.from_pretrained(tmp_path / "mlm")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_legacy_head_layout_loads(tmp_path):
    """transformers' default MLM head (``legacy``: cls.predictions with a decoder tied to the word embeddings)."""
    config = _config("c2p+p2c-shared")
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForMaskedLM(_hf_config(config, legacy=True))
    _randomize(hf, 3)
    hf.save_pretrained(str(tmp_path))
    ours, info = DebertaForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info.missing_keys == [] and info.unexpected_keys == []
    _compare(ours, hf, config)


def test_mlm_loss_matches_transformers(tmp_path):
    config = _config("c2p+p2c-separate")
    torch.manual_seed(0)
    ours = DebertaForMaskedLM(config)
    _randomize(ours, 4)
    ours.save_pretrained(tmp_path)
    hf = _hf_load(transformers.DebertaV2ForMaskedLM, tmp_path)
    ids, mask, _ = _batches(config)[-1]
    labels = torch.where((torch.arange(ids.shape[1]) % 3 == 0) & mask.bool(), ids, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        out = ours(ids, mask, labels=labels)
    assert abs(out.loss.item() - ref.item()) <= TOL


def test_v3_preset_defaults_round_trip(tmp_path):
    """deberta-tiny with v3's switches (256 buckets over max_position_embeddings 512, shared keys, both terms)."""
    config = DebertaConfig.preset("deberta-tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert (config.position_buckets, config.relative_distance, config.share_att_key) == (256, 512, True)
    assert set(config.pos_att_type) == {"c2p", "p2c"} and not config.position_biased_input
    torch.manual_seed(0)
    ours = DebertaForMaskedLM(config)
    ours.save_pretrained(tmp_path)
    hf = _hf_load(transformers.DebertaV2ForMaskedLM, tmp_path)
    ids = torch.randint(1, 1000, (1, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits).abs().max() <= TOL


def test_presets_are_v3_shapes():
    for name, layers in (("deberta-small", 6), ("deberta-base", 12)):
        c = DebertaConfig.preset(name)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
            layers,
            768,
            12,
            3072,
        )
        assert (c.vocab_size, c.position_buckets, c.max_relative_positions) == (128100, 256, -1)
        assert c.pos_att_type == ("p2c", "c2p") and c.share_att_key and c.norm_rel_ebd == "layer_norm"
    with pytest.raises(ConfigError, match="deberta-huge"):
        DebertaConfig.preset("deberta-huge")


@pytest.mark.parametrize(
    "buckets,distance,length", [(8, 32, 64), (8, 64, 64), (16, 40, 100), (256, 512, 700), (6, 20, 30), (-1, 16, 40)]
)
def test_relative_positions_match_transformers(buckets, distance, length):
    x = torch.zeros(length, 1)
    want = hf_deberta.build_relative_position(x, x, bucket_size=buckets, max_position=distance)[0]
    got = dsa.relative_positions(length, buckets, distance)
    assert torch.equal(got, want)
    assert torch.equal(got, -got.t())  # odd in the distance: both position terms read the same table row


def test_training_mode_runs_and_the_position_weights_learn():
    config = _config("c2p+p2c-separate").replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = DebertaForMaskedLM(config).train()
    ids, mask, _ = _batches(config)[-1]
    labels = torch.where(mask.bool(), ids, -100)
    model(ids, mask, labels=labels).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("rel_embeddings.weight", "rel_norm.weight", "layers.1.pos_key.weight", "layers.0.pos_query.weight"):
        assert grads[f"deberta.encoder.{name}"].abs().sum() > 0, name


# Bad input ------------------------------------------------------------------------------------------------------
def _write_config(path, **changes):
    d = DebertaConfig(**SMALL).to_dict()
    d.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "changes,key",
    [
        (dict(conv_kernel_size=3), "conv_kernel_size"),
        (dict(pos_att_type="p2c|p2p"), "pos_att_type"),
        (dict(pos_att_type=["c2p", "c2p"]), "pos_att_type"),
        (dict(relative_attention=False), "relative_attention"),
        (dict(z_steps=2), "z_steps"),
        (dict(embedding_size=16), "embedding_size"),
        (dict(attention_head_size=8), "attention_head_size"),
        (dict(model_type="deberta"), "model_type"),
        (dict(position_buckets=256, max_relative_positions=-1), "position_buckets"),
        (dict(norm_rel_ebd="batch_norm"), "norm_rel_ebd"),
    ],
)
def test_unsupported_configs_are_refused_before_weights_are_read(changes, key, tmp_path):
    directory = _write_config(tmp_path, **changes)  # no weights at all: the config must fail first
    with pytest.raises(ConfigError, match=key):
        DebertaForMaskedLM.from_pretrained(directory)


def test_transformers_defaults_fill_keys_a_config_leaves_out(tmp_path):
    """A config.json without relative attention is transformers' default (absolute only), which this port refuses."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "hidden_size": 32}))
    with pytest.raises(ConfigError, match="relative_attention"):
        DebertaModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "changes",
    [dict(position_buckets=8, max_relative_positions=5), dict(position_buckets=1), dict(position_buckets=64)],
)
def test_undefined_bucket_settings_fail_at_construction(changes):
    with pytest.raises(ConfigError, match="position_buckets"):
        DebertaModel(DebertaConfig(**{**SMALL, **changes}))


def test_enhanced_mask_decoder_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    DebertaForMaskedLM(_config("c2p+p2c-shared")).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_predictions.emd.layer.0.attention.self.query_proj.weight"] = torch.zeros(32, 32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_predictions.emd.layer.0"):
        DebertaForMaskedLM.from_pretrained(tmp_path)


def test_an_untied_legacy_decoder_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = DebertaForMaskedLM(_config("c2p+p2c-shared"))
    _write_config(tmp_path, legacy=True)
    state = {name: model.state_dict()[key] for key, name in checkpoint_key_map(model, legacy=True).items()}
    state["cls.predictions.decoder.weight"] = torch.zeros_like(state["deberta.embeddings.word_embeddings.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight"):
        DebertaForMaskedLM.from_pretrained(tmp_path)


def test_too_long_for_absolute_positions_names_the_length():
    model = DebertaModel(_config("absolute-segments-raw").replace(max_position_embeddings=16, max_relative_positions=8))
    with pytest.raises(IndexError, match="20 positions.*max_position_embeddings is 16"):
        model(torch.ones(1, 20, dtype=torch.long))
    # a relative-only model has no such limit: distances beyond the table share its last rows
    relative = DebertaModel(DebertaConfig(**{**SMALL, "max_position_embeddings": 16, "max_relative_positions": 8}))
    assert relative(torch.ones(1, 20, dtype=torch.long)).last_hidden_state.shape == (1, 20, 32)
    with pytest.raises(ValueError, match="position_ids"):
        relative(torch.ones(1, 4, dtype=torch.long), position_ids=torch.arange(4)[None])


def test_a_v3_base_config_json_is_the_base_preset():
    """The switches of DeBERTa-v3-base's published config.json (``pos_att_type`` as a ``|`` string) read back as the
    ``deberta-base`` preset, without warnings."""
    published = {
        "model_type": "deberta-v2",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "relative_attention": True,
        "position_buckets": 256,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "pos_att_type": "p2c|c2p",
        "layer_norm_eps": 1e-7,
        "max_relative_positions": -1,
        "position_biased_input": False,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "type_vocab_size": 0,
        "vocab_size": 128100,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DebertaConfig.from_dict(published) == DebertaConfig.preset("deberta-base")
