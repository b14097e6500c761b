"""A checkpoint from elsewhere must not run code when loaded: export, finetune --model and resume refuse a
pickle that names a callable, before DeepSpeed (which loads with ``weights_only=False``) ever opens it, while
DeepSpeed's own plain classes still load."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from fastbert.config import BertConfig
from fastbert.train import checkpoint
from fastbert.train.export import export

TAG = "step-00000002"


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(path: Path, marker: Path) -> None:
    torch.save(
        {"module": {}, "buffer_names": [], "param_shapes": [{}], "ds_version": "0.19.8", "payload": RunsCode(marker)},
        path,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory whose one checkpoint looks complete (latest pointer, config, RNG state) but whose model
    states hold ``RunsCode``."""
    ckpt = tmp_path / "run" / checkpoint.CHECKPOINTS / TAG
    ckpt.mkdir(parents=True)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    (ckpt / "config.json").write_text(config.to_json_string())
    torch.save(checkpoint.rng_state(), ckpt / "rng-rank0.pt")
    plant(ckpt / "mp_rank_00_model_states.pt", tmp_path / "MARKER")
    (ckpt.parent / checkpoint.LATEST).write_text(TAG)
    return tmp_path / "run"


def test_the_planted_file_runs_code_when_unpickled(run_dir, tmp_path):
    """The bait is live: a plain pickle load of it does create the marker."""
    torch.load(run_dir / checkpoint.CHECKPOINTS / TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("zero", [False, True], ids=["module-states", "zero-partitions"])
def test_export_refuses_a_checkpoint_that_would_run_code(run_dir, tmp_path, zero):
    ckpt = run_dir / checkpoint.CHECKPOINTS / TAG
    if zero:  # with optimizer partitions the weights come from DeepSpeed's zero_to_fp32
        torch.save({}, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(checkpoint.CheckpointNotFound) as refused:
        export(run_dir, tmp_path / "hf")
    assert not (tmp_path / "MARKER").exists(), "loading the checkpoint ran its code"
    assert isinstance(refused.value, checkpoint.UnsafeCheckpoint)
    message = str(refused.value)
    assert "mp_rank_00_model_states.pt: refused" in message and "system" in message, message
    assert "weights_only` set to `False`" not in message  # torch's advice to load it anyway is not passed on
    assert not (tmp_path / "hf").exists()


def test_the_commands_report_the_refusal(run_dir, tmp_path, capsys):
    from fastbert.cli import main

    (tmp_path / "train.tsv").write_text("text\tlabel\na fine day\tpos\na bad day\tneg\n")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 1
    assert (
        main(
            [
                "finetune",
                "--task",
                "classify",
                "--model",
                str(run_dir),
                "--train",
                str(tmp_path / "train.tsv"),
                "--out",
                str(tmp_path / "ft"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert not (tmp_path / "MARKER").exists(), "loading the checkpoint ran its code"
    err = capsys.readouterr().err
    for command in ("export", "finetune"):
        assert f"fastbert {command}: error: {run_dir / checkpoint.CHECKPOINTS / TAG}" in err, err


class DeepSpeedLikeEngine:
    """Loads the model states the way DeepSpeed's TorchCheckpointEngine does: ``weights_only=False``."""

    def __init__(self) -> None:
        self.loaded: list[Path] = []

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.loaded.append(path)
        return str(path), torch.load(path, map_location="cpu", weights_only=False).get("client_state", {})


def test_resume_refuses_before_deepspeed_loads(run_dir, tmp_path):
    engine = DeepSpeedLikeEngine()
    with pytest.raises(checkpoint.CheckpointNotFound):
        checkpoint.load(engine, checkpoint.resolve(run_dir))
    assert not (tmp_path / "MARKER").exists(), "loading the checkpoint ran its code"
    assert engine.loaded == []


def test_every_file_is_checked_not_only_the_model_states(run_dir, tmp_path):
    ckpt = run_dir / checkpoint.CHECKPOINTS / TAG
    torch.save({"module": {}}, ckpt / "mp_rank_00_model_states.pt")
    plant(ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tmp_path / "MARKER")
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: refused"):
        checkpoint.verify_safe(ckpt)
    assert not (tmp_path / "MARKER").exists()


def test_deepspeed_optimizer_states_pass_and_nothing_else_does(tmp_path):
    """What DeepSpeed's ZeRO 1/2 partitions hold (loss scalers, stage enum, fragment addresses) loads; any other
    class, even a harmless one, is refused."""
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    states = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=6, start=0)}],
        "single_partition_of_fp32_groups": [torch.arange(6.0)],
        "fp16_scaler": DynamicLossScaler(
            init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
        ),
    }
    ckpt = tmp_path / TAG
    ckpt.mkdir()
    torch.save(states, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    checkpoint.verify_safe(ckpt)
    loaded = checkpoint.load_weights_only(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"].numel == 6
    assert loaded["fp16_scaler"].cur_scale == 2.0**16 and loaded["fp16_scaler"].scale_window == 1000
    torch.save({**states, "args": argparse.Namespace(lr=1.0)}, ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="Namespace"):
        checkpoint.verify_safe(ckpt)
    assert sorted(c.__name__ for c in checkpoint.deepspeed_safe_globals()) == [
        "DynamicLossScaler",
        "LossScaler",
        "ZeroStageEnum",
        "fragment_address",
    ]


def test_a_truncated_checkpoint_is_named_as_unreadable(run_dir, tmp_path):
    path = run_dir / checkpoint.CHECKPOINTS / TAG / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(
        checkpoint.UnsafeCheckpoint,
        match=r"mp_rank_00_model_states.pt: unreadable, the file is "
        r"truncated or corrupted",
    ):
        export(run_dir, tmp_path / "hf")


# Manifests: every file's sha256 and size, checked before anything is loaded ------------------------------------
@pytest.fixture
def safe_run(tmp_path: Path) -> Path:
    """A run directory with one complete, harmless checkpoint and its manifest."""
    ckpt = tmp_path / "run" / checkpoint.CHECKPOINTS / TAG
    ckpt.mkdir(parents=True)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    (ckpt / "config.json").write_text(config.to_json_string())
    from fastbert.model import BertForPreTraining

    torch.save({"module": BertForPreTraining(config).state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    torch.save(checkpoint.rng_state(), ckpt / "rng-rank0.pt")
    checkpoint.write_manifest(ckpt, finite=True)
    (ckpt.parent / checkpoint.LATEST).write_text(TAG)
    return tmp_path / "run"


def test_a_checkpoint_matching_its_manifest_exports(safe_run, tmp_path):
    export(safe_run, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "sha256 differs from MANIFEST.json"),
        ("truncate", "\\d+ bytes but \\d+ when saved \\(truncated\\?\\)"),
        ("delete", "missing \\(listed in MANIFEST.json\\)"),
    ],
)
def test_a_damaged_file_is_named_before_anything_loads(safe_run, tmp_path, damage, message):
    path = safe_run / checkpoint.CHECKPOINTS / TAG / "mp_rank_00_model_states.pt"
    if damage == "flip":
        _flip(path, path.stat().st_size // 2)  # in the middle of the weights: torch would load it as it is
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=f"mp_rank_00_model_states.pt: {message}"):
        export(safe_run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_non_finite_weights(safe_run, tmp_path):
    ckpt = safe_run / checkpoint.CHECKPOINTS / TAG
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    state["module"]["bert.encoder.layers.0.ffn_in.weight"][0, 0] = float("nan")
    torch.save(state, ckpt / "mp_rank_00_model_states.pt")
    checkpoint.write_manifest(ckpt, finite=False)
    with pytest.raises(
        checkpoint.CorruptCheckpoint, match="non-finite weights .* in bert.encoder.layers.0.ffn_in.weight"
    ):
        export(safe_run, tmp_path / "hf")


def test_rotation_never_deletes_the_last_checkpoint_with_finite_weights(tmp_path):
    root = tmp_path / checkpoint.CHECKPOINTS
    finite = {1: True, 2: True, 3: False, 4: False, 5: False}
    for step, ok in finite.items():
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        checkpoint.write_manifest(root / checkpoint.tag_for(step), finite=ok)
    checkpoint._rotate(root, checkpoint.tag_for(5), keep=2)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.tag_for(s) for s in (2, 4, 5)]
    checkpoint.write_manifest(root / checkpoint.tag_for(5), finite=True)  # finite again: rotation as usual
    checkpoint._rotate(root, checkpoint.tag_for(5), keep=2)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.tag_for(s) for s in (4, 5)]


def test_export_names_weights_that_do_not_fit_the_config(safe_run, tmp_path):
    ckpt = safe_run / checkpoint.CHECKPOINTS / TAG
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    del state["module"]["cls.bias"]
    torch.save(state, ckpt / "mp_rank_00_model_states.pt")
    checkpoint.write_manifest(ckpt, finite=True)
    with pytest.raises(
        checkpoint.CorruptCheckpoint, match="weights do not match the checkpoint's config.json .*cls.bias"
    ):
        export(safe_run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
