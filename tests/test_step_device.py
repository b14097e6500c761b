"""The pretraining step against a stand-in engine on the ``meta`` device, with a stand-in ``all_reduce`` that refuses
tensors anywhere else: catches the mixed-device bugs (a CPU batch handed to a GPU model, CPU tensors in an NCCL
collective) that a CPU-only run cannot show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbert.data.masking import MaskingCollator
from fastbert.data.shards import Sample
from fastbert.model import PreTrainingOutput
from fastbert.train.step import SUMS, optimizer_step

META = torch.device("meta")


class MetaEngine:
    """Checks that every tensor it is given lives on its device; returns meta outputs."""

    device = META

    def __init__(self):
        self.forwards = self.backwards = self.steps = 0

    def __call__(self, **inputs):
        for name, value in inputs.items():
            if torch.is_tensor(value):
                assert value.device == META, f"{name} reached the engine on {value.device}"
        self.forwards += 1
        scalar = torch.empty((), device=META)
        return PreTrainingOutput(
            loss=scalar, mlm_loss=scalar, sentence_loss=scalar, mlm_accuracy=scalar, sentence_accuracy=scalar
        )

    def backward(self, loss):
        assert loss.device == META
        self.backwards += 1

    def step(self):
        self.steps += 1


def refusing_all_reduce(tensor):
    if tensor.device != META:
        raise RuntimeError(f"all_reduce on a {tensor.device} tensor: NCCL refuses tensors off the GPU")


def _micro_batches(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    collate = MaskingCollator(500, [0, 1, 2, 3, 4], 4, seed=1)
    batches = []
    for m in range(count):
        samples = [
            Sample(
                np.concatenate([[2], rng.integers(5, 500, n), [3]]), np.zeros(n + 2, np.int64), int(rng.integers(0, 2))
            )
            for n in (7, 30, 12)
        ]
        indices = np.arange(3) + 3 * m
        batches.append(collate(samples, indices, np.zeros(3, np.int64)))
    return batches


def test_the_step_keeps_batches_and_collectives_on_the_engine_device():
    engine = MetaEngine()
    sums = optimizer_step(
        engine, _micro_batches(3), world_size=2, skipped=lambda: False, all_reduce=refusing_all_reduce
    )
    assert sums.device == META and sums.shape == (len(SUMS),)
    assert engine.forwards == engine.backwards == engine.steps == 3


def test_the_refusing_all_reduce_does_refuse():
    with pytest.raises(RuntimeError, match="NCCL refuses"):
        refusing_all_reduce(torch.zeros(2))
