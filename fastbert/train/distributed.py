"""Where a training process runs: its device, its process group, fp32 matmul precision, and the one function that
moves a batch onto the device.

The drivers (pretrain, finetune, distill) follow one rule for the GPU: a batch crosses to the device in
:func:`to_device` and nowhere else (from pinned host memory, without blocking), and collectives only ever see tensors
that live on the device the backend communicates from (NCCL refuses CPU tensors).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist


class _DropDeepSpeedNoise(logging.Filter):
    """DeepSpeed warnings that say nothing to a fastbert user: fastbert's LAMB is ZeRO-aware by design (DeepSpeed
    calls every client optimizer under ZeRO "untested")."""

    NOISE = ("untested optimizer",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_deepspeed() -> None:
    """Call before importing DeepSpeed: on a machine without CUDA it is told the accelerator is the CPU (else it warns
    that it could not find a GPU on every import), and its noise is filtered."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropDeepSpeedNoise) for f in ds_logger.filters):
        ds_logger.addFilter(_DropDeepSpeedNoise())


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` picks it under a launcher) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def set_tf32(enabled: bool) -> None:
    """Let fp32 matmuls (and cuDNN convolutions) use TF32 tensor cores on Ampere and newer GPUs: about 8x the fp32
    throughput with a 10-bit mantissa for the products and fp32 accumulation. (fastbert's fp32 attention kernel keeps
    IEEE fp32 dots.) A no-op on the CPU."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def to_device(batch: dict, device: torch.device, keys: Iterable[str] | None = None) -> dict:
    """The entries of ``batch`` (those named in ``keys``, or all) with every tensor on ``device``: the one place a
    batch crosses to the engine. From pinned host memory the copy does not block the host."""
    names = batch.keys() if keys is None else [k for k in keys if k in batch]
    return {k: move(batch[k], device) for k in names}


def move(value, device: torch.device):
    """A tensor, or an object with a ``to(device, non_blocking=...)`` method such as ``fastbert.model.Layout``, on
    ``device``; anything else as it is."""
    if torch.is_tensor(value) or hasattr(value, "to"):
        return value.to(device, non_blocking=True)
    return value


def pin(batch: dict) -> dict:
    """``batch`` with its host tensors (and layouts) in page-locked memory, so that :func:`to_device` copies them
    asynchronously. Only worth it when the device is a GPU."""
    return {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float) -> None:
    """Join (or, in a plain process, make) the process group: NCCL on GPUs, gloo on the CPU, with ``timeout_s``
    for every collective. The launcher's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) say where; a plain
    process makes a world of one on a free loopback port."""
    quiet_deepspeed()
    import deepspeed

    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed runs its collectives on groups of its own (``dist.new_group`` with no timeout: a clone of the world
    # for data parallelism, ZeRO's groups), and torch gives such a group its default timeout (30 minutes for gloo),
    # not the world group's. So that a dead or hung rank fails the run within --dist-timeout whichever collective the
    # others are waiting in, every group made from here on gets it as its default.
    dist.distributed_c10d.default_pg_timeout = timeout
    if torch.cuda.is_available():
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
        torch.cuda.set_device(default_device())  # before NCCL's first collective picks device 0 on every rank
    if os.environ.get("WORLD_SIZE") == "1":
        _skip_shared_memory_op()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def _skip_shared_memory_op() -> None:
    """A world of one exchanges nothing, yet DeepSpeed's communication backend JIT-compiles its CPU shared-memory
    all-reduce op on start-up (half a minute or more when the build cache is cold or was built with other flags).
    DeepSpeed treats a missing op as "use torch.distributed", so for one process the builder is skipped. (A private
    DeepSpeed function, patched by name: pyproject pins deepspeed below 0.20.)"""
    import importlib

    try:  # not `import deepspeed.comm.torch as m`: deepspeed.comm has an attribute `torch`, the torch package
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None
