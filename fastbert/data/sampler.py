"""Which samples go into which optimizer step, on which rank: a deterministic, resumable batch plan.

The data is an endless stream: epoch after epoch, each a permutation of all sample indices drawn from
``(seed, epoch)``. Optimizer step ``s`` takes the global batch ``stream[s * G : (s + 1) * G]``; nothing is dropped at
an epoch's end, the batch just runs on into the next epoch. Each data-parallel rank takes its contiguous slice of
the global batch and cuts it into micro-batches for gradient accumulation, so one rank accumulating over the whole
global batch and N ranks each taking 1/N of it see the same samples in the same step.

A position counts micro-batches on this rank: ``position = step * accumulation + micro``. ``MicroBatchPlan`` maps a
position to sample indices with no hidden state, so the plan can be resumed exactly from a saved position and is
safe to use from DataLoader workers: ``MicroBatchDataset`` turns positions into lists of samples and tags each
micro-batch with its position, which the training loop saves as ``position + 1`` after consuming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class PlanError(ValueError):
    """A batch plan that cannot be built or resumed as asked."""


@dataclass(frozen=True)
class MicroBatchPlan:
    num_samples: int
    global_batch: int
    micro_batch: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise PlanError(f"the dataset is empty (num_samples={self.num_samples})")
        if not 0 <= self.rank < self.world_size:
            raise PlanError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.global_batch % (self.micro_batch * self.world_size):
            raise PlanError(
                f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} x world size "
                f"{self.world_size} = {self.micro_batch * self.world_size}"
            )

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch // (self.micro_batch * self.world_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        return _epoch_permutation(self.seed, epoch, self.num_samples)

    def stream(self, start: int, count: int) -> np.ndarray:
        """Entries ``start .. start + count`` of the endless stream of epoch permutations."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, self.num_samples)
            take = min(self.num_samples - offset, count - filled)
            out[filled : filled + take] = self._permutation(epoch)[offset : offset + take]
            filled += take
        return out

    def stream_start(self, position: int) -> int:
        """Where this rank's micro-batch at ``position`` starts in the stream."""
        step, micro = divmod(position, self.accumulation)
        return step * self.global_batch + (self.rank * self.accumulation + micro) * self.micro_batch

    def indices(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices of this rank's micro-batch at ``position``, and the epoch each one is drawn in."""
        start = self.stream_start(position)
        epochs = (start + np.arange(self.micro_batch)) // self.num_samples
        return self.stream(start, self.micro_batch), epochs

    # Resume -------------------------------------------------------------------------------------------------------
    def state_dict(self, next_position: int) -> dict[str, Any]:
        return {
            "next_position": int(next_position),
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def check_state(self, state: dict[str, Any]) -> int:
        """Validate a saved state against this plan; returns the position to resume from."""
        for key in ("num_samples", "global_batch", "seed"):
            if state.get(key) != getattr(self, key):
                raise PlanError(
                    f"cannot resume: the saved data plan has {key}={state.get(key)!r} but this run has "
                    f"{getattr(self, key)!r}"
                )
        return int(state["next_position"])


class MicroBatchDataset(torch.utils.data.Dataset):
    """Position -> ``collate(samples, indices, epochs)`` for that micro-batch, with ``batch["position"]`` set.

    Use with ``DataLoader(MicroBatchDataset(...), batch_size=None, sampler=range(start, stop))`` (or
    ``itertools.count(start)`` for an endless run); each worker computes its batches from positions alone.
    """

    def __init__(
        self, dataset: Sequence, plan: MicroBatchPlan, collate: Callable[[list, np.ndarray, np.ndarray], dict]
    ):
        self.dataset, self.plan, self.collate = dataset, plan, collate

    def __len__(self) -> int:  # positions are unbounded; a DataLoader only needs this for its own bookkeeping
        return 2**62

    def __getitem__(self, position: int) -> dict:
        indices, epochs = self.plan.indices(position)
        batch = self.collate([self.dataset[int(i)] for i in indices], indices, epochs)
        batch["position"] = position
        return batch
