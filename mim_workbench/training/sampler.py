"""Which samples each optimiser step sees: a pure function of (seed, epoch, step).

Exact resume and multi-process equivalence both follow from this module: the
order of an epoch is ``torch.randperm`` with a generator seeded from
``(seed, epoch)``, so a resumed run recomputes the same order and skips the steps
it already did, and every process of a torchrun job computes the same global
batches and takes its own contiguous slice of each.

An epoch is ``ceil(n / (batch * accum))`` steps; the permutation is repeated
(wrapped) to fill the last step, so every batch has the full size.  Uniform
batches keep the loss scale, the learning-rate rule and the per-process slices
identical on every step, and let a data set smaller than one batch still train.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, stable generator seed for every (seed, epoch) pair."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2**63 - 1)


@dataclass(frozen=True)
class StepPlan:
    n: int                 # training samples
    batch_size: int        # global micro-batch
    accum_steps: int
    seed: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("the training split is empty: nothing to train on")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size={self.batch_size} must be divisible by the number of processes "
                f"({self.world_size}) so that every process gets the same share"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch, ``ceil(n / (batch_size * accum_steps))`` (the last one wraps around)."""
        return math.ceil(self.n / (self.batch_size * self.accum_steps))

    @property
    def local_batch(self) -> int:
        """This process's share of a global micro-batch, ``batch_size // world_size`` samples."""
        return self.batch_size // self.world_size

    def local_slice(self) -> slice:
        """This process's rows of a global micro-batch."""
        b = self.local_batch
        return slice(self.rank * b, (self.rank + 1) * b)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of the whole epoch, ``steps_per_epoch * batch * accum`` long."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g)
        need = self.steps_per_epoch * self.batch_size * self.accum_steps
        reps = math.ceil(need / self.n)
        return perm.repeat(reps)[:need]

    def global_micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[int]]:
        """Global micro-batches (lists of ``batch_size`` indices) from ``start_step`` on."""
        order = self.epoch_order(epoch).tolist()
        B = self.batch_size
        for mb in range(start_step * self.accum_steps, self.steps_per_epoch * self.accum_steps):
            yield order[mb * B:(mb + 1) * B]


class LocalBatches:
    """``batch_sampler`` for a DataLoader: this process's part of each global micro-batch."""

    def __init__(self, plan: StepPlan, epoch: int, start_step: int = 0) -> None:
        self.plan, self.epoch, self.start_step = plan, epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        sl = self.plan.local_slice()
        for batch in self.plan.global_micro_batches(self.epoch, self.start_step):
            yield batch[sl]

    def __len__(self) -> int:
        return max(0, (self.plan.steps_per_epoch - self.start_step) * self.plan.accum_steps)
