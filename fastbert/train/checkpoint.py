"""Training checkpoints: DeepSpeed engine state plus what exact resume and export need, with a ``latest`` pointer
that only ever names a complete checkpoint.

Layout: ``RUN_DIR/checkpoints/step-00000100/`` holds DeepSpeed's files, ``rng-rank{r}.pt`` (every RNG state of
rank r), ``config.json``, ``vocab.txt`` and ``tokenizer_config.json``; the training position travels in DeepSpeed's
``client_state``. ``RUN_DIR/checkpoints/latest`` names the newest complete tag: it is replaced atomically by rank 0
after every rank has finished writing, so a run killed mid-save resumes from the previous checkpoint.

Each checkpoint's ``MANIFEST.json`` (written last, before ``latest``) lists the sha256 and size of every file in it and
whether the weights were all finite; resume, ``--init-from`` and export verify it first, so a flipped byte or a
truncated file is an error naming the file instead of a run of NaN steps. Rotation keeps the last ``keep``
checkpoints and, should none of them have finite weights, the newest one that has.

A checkpoint may come from elsewhere (``--resume``, ``--init-from``, ``export``, ``finetune --model``), and DeepSpeed
reads its own files with ``torch.load(weights_only=False)``, which runs whatever code a pickle names. So before
DeepSpeed sees a checkpoint, ``verify_safe`` parses every ``.pt`` file in it with ``weights_only=True``, allowing only
tensors, containers and the few plain DeepSpeed classes of ``deepspeed_safe_globals``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fastbert.atomic import write_atomic

log = logging.getLogger("fastbert.train")

LATEST = "latest"
CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"


class CheckpointNotFound(FileNotFoundError):
    pass


class CorruptCheckpoint(CheckpointNotFound):
    """A checkpoint whose files do not match its manifest (changed, truncated or missing), or whose weights do not
    fit its own config.json (missing, unexpected or non-finite tensors)."""


class UnsafeCheckpoint(CheckpointNotFound):
    """A checkpoint file that ``torch.load(weights_only=True)`` refuses: loading it could run code. A kind of
    ``CheckpointNotFound``, so every command that reports a missing checkpoint reports this one too."""


def deepspeed_safe_globals() -> list[type]:
    """The classes besides tensors and containers that DeepSpeed pickles into our checkpoints: its ZeRO 1/2
    optimizer states hold the loss scaler (``LossScaler`` in fp32 and bf16 runs; ``DynamicLossScaler`` in fp16 runs,
    which need CUDA, so that one comes from reading ``DeepSpeedZeroOptimizer.state_dict`` rather than from a saved
    run), the stage as a ``ZeroStageEnum`` and each parameter's ``fragment_address``. Each is plain data: unpickling
    one sets attributes and calls no code of the file's choosing. Model-state and RNG files need none of them."""
    from fastbert.train.distributed import quiet_deepspeed

    quiet_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file that refuses anything but weights and DeepSpeed's plain classes."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refusal(e: Exception) -> str:
    """torch's reason for refusing a file, without its advice to retry with ``weights_only=False``."""
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError):
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        text = " ".join(p for p in paragraphs[1:] if not p.startswith("Check the documentation")) or text
    return " ".join(text.split())


def verify_safe(checkpoint: Path) -> None:
    """Raise ``UnsafeCheckpoint`` unless every ``.pt`` file of ``checkpoint`` loads with ``weights_only=True``.

    Call it before handing the checkpoint to DeepSpeed, whose loads (``engine.load_checkpoint``, ``zero_to_fp32``)
    pass ``weights_only=False``: they then read only files that have been shown to hold no code. Zip-format files
    are memory-mapped, so this parses each pickle without reading the tensors' bytes."""
    for path in sorted(Path(checkpoint).glob("*.pt")):
        try:
            load_weights_only(path, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:  # a global outside the allow-list: loading it could run code
            raise UnsafeCheckpoint(
                f"{path}: refused: it does not load with torch.load(weights_only=True), and "
                f"loading it otherwise could run code: {_refusal(e)}"
            ) from e
        except Exception as e:  # a truncated or corrupted file (torch's zip reader, an early EOF)
            raise UnsafeCheckpoint(
                f"{path}: unreadable, the file is truncated or corrupted ({_refusal(e)}); "
                "resume or export from another checkpoint"
            ) from e


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run directory, its ``checkpoints`` directory or a checkpoint itself."""
    path = Path(path)
    for root in (path / CHECKPOINTS, path):
        if (root / LATEST).exists():
            tag = (root / LATEST).read_text().strip()
            if not (root / tag).is_dir():
                raise CheckpointNotFound(f"{root / LATEST} names {tag!r}, which does not exist")
            return root / tag
    if (path / "config.json").exists() and any(path.glob("*model_states.pt")):
        return path
    raise CheckpointNotFound(f"{path}: no checkpoint (no {CHECKPOINTS}/{LATEST}, {LATEST}, or checkpoint files)")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path, finite: bool) -> None:
    """Record every file of ``checkpoint`` (sha256, size) and whether its weights were finite."""
    files = {
        p.relative_to(checkpoint).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    }
    manifest = {"format": 1, "finite": finite, "files": files}
    write_atomic(checkpoint / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable manifest ({e}); resume or export from another checkpoint") from e
    return manifest


def verify_manifest(checkpoint: Path) -> None:
    """Raise ``CorruptCheckpoint`` naming the first file that is missing, or whose size or sha256 differs from the
    manifest. A checkpoint without a manifest (written by other tools) passes with a warning."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest is None:
        log.warning("%s: no %s, so its files cannot be checked against checksums", checkpoint, MANIFEST)
        return
    advice = "resume or export from another checkpoint (--resume PATH)"
    for name, entry in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{path}: missing (listed in {MANIFEST}); {advice}")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptCheckpoint(
                f"{path}: {path.stat().st_size} bytes but {entry['bytes']} when saved (truncated?); {advice}"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"{path}: sha256 differs from {MANIFEST}: the file changed since saving; {advice}")


def weights_finite(engine) -> bool:
    """Whether every parameter of the engine's model is finite (one host sync; called only when saving)."""
    flags = [torch.isfinite(p.detach()).all() for p in engine.module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _rotate(root: Path, newest: str, keep: int) -> None:
    """Delete all but the last ``keep`` checkpoints, never the newest one whose weights are finite."""
    tags = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    if keep <= 0:
        return
    kept = set(tags[-keep:]) | {newest}

    def finite(tag: str) -> bool:
        try:
            manifest = read_manifest(root / tag)
        except CorruptCheckpoint:
            return False
        return bool(manifest and manifest.get("finite"))

    if not any(finite(t) for t in kept):
        last_finite = next((t for t in reversed(tags) if finite(t)), None)
        if last_finite is not None:
            kept.add(last_finite)
            log.warning("keeping %s: the newer checkpoints hold non-finite weights", root / last_finite)
    for old in tags:
        if old not in kept:
            shutil.rmtree(root / old, ignore_errors=True)


def save(engine, run_dir: Path, step: int, client_state: dict[str, Any], files: dict[str, bytes], keep: int) -> Path:
    """Save on every rank; returns the checkpoint directory."""
    root = Path(run_dir) / CHECKPOINTS
    tag = tag_for(step)
    finite = weights_finite(engine)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    write_atomic(root / tag / f"rng-rank{rank}.pt", buffer.getvalue())
    if rank == 0:
        for name, data in files.items():
            write_atomic(root / tag / name, data)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_manifest(root / tag, finite)
        write_atomic(root / LATEST, tag.encode())
        _rotate(root, tag, keep)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def load(engine, checkpoint: Path, load_optimizer: bool = True) -> dict[str, Any]:
    """Load the engine state (and optimizer state unless ``load_optimizer`` is false); returns the client state."""
    verify_manifest(checkpoint)
    verify_safe(checkpoint)
    path, client_state = engine.load_checkpoint(
        str(checkpoint.parent),
        tag=checkpoint.name,
        load_optimizer_states=load_optimizer,
        load_lr_scheduler_states=False,
        load_module_only=not load_optimizer,
    )
    if path is None:
        raise CheckpointNotFound(f"{checkpoint}: DeepSpeed could not load it")
    return client_state or {}


def restore_rng(checkpoint: Path) -> None:
    """Put this rank's RNGs where they were at the checkpoint; call last, just before the first step, since
    building models and data loaders draws random numbers."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = checkpoint / f"rng-rank{rank}.pt"
    if not path.exists():  # resuming on more ranks than wrote the checkpoint: data order stays exact, dropout not
        log.warning("%s: no RNG state for rank %d; its random streams start afresh", checkpoint, rank)
        return
    set_rng_state(torch.load(path, weights_only=True))
