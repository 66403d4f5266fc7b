"""Samplers that know the epoch, shard by global position, and balance classes across ranks.

Every sampler yields ``(index, epoch)`` keys: the dataset seeds an item's augmentation
from (seed, epoch, index), never from worker or rank state, so what sample i looks
like in epoch e does not depend on num_workers or the world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from distrib.context import DistContext
from distrib.seeding import SAMPLER, derive_seed, entropy

Key = tuple[int, int]


class _EpochGuard:
    """Warn when the same epoch is iterated twice: the shuffle would repeat."""

    epoch: int
    _last: int | None = None

    def _check_epoch(self) -> None:
        if self._last == self.epoch:
            warnings.warn(
                f"{type(self).__name__} iterated twice for epoch {self.epoch}: the order repeats. "
                "Iterate through ImageLoader.epoch(e), which calls set_epoch(e).",
                stacklevel=3,
            )
        self._last = self.epoch


class GlobalOrder(_EpochGuard, Sampler[Key]):
    """An epoch's global order of samples, the same at every world size, sharded by position.

    Why positions: elastic training resumes a run on another number of ranks. The epoch's
    order (``order(epoch)``, seeded by (seed, epoch) only) and its tail rule do not depend
    on the world size, so "sample c of epoch e" means the same sample at 1, 2 or 5 ranks:
      - an epoch trains the first ``epoch_samples = (N // G) * G`` positions of its order, in
        optimizer steps of the global batch G; the N mod G positions after them are left
        out of that epoch (different samples each epoch, since the order changes);
      - rank r of W takes positions ``start + r, start + r + W, ...``, so micro-step j of all
        ranks covers positions [start + j*W*b, start + (j+1)*W*b), and optimizer step s the
        positions [s*G, (s+1)*G), whatever W, b and the accumulation are.
    """

    def __init__(self, n: int, ctx: DistContext, global_batch: int):
        if global_batch % ctx.world_size:
            raise ValueError(f"global batch {global_batch} is not a multiple of {ctx.world_size} ranks")
        self.n, self.rank, self.world = n, ctx.rank, ctx.world_size
        self.global_batch = global_batch
        self.epoch_samples = (n // global_batch) * global_batch
        self.epoch = 0
        self.start = 0  # resume mid-epoch: skip this many of the epoch's positions, once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's global order: dataset indices by position (all ``n`` of them)."""
        raise NotImplementedError

    def start_at(self, samples: int) -> None:
        """The next iteration starts ``samples`` positions into the epoch (a multiple of G)."""
        if samples % self.global_batch or not 0 <= samples <= self.epoch_samples:
            raise ValueError(
                f"cannot resume at sample {samples}: not a step boundary of the global batch "
                f"{self.global_batch} within the epoch's {self.epoch_samples} samples"
            )
        self.start = samples

    def __len__(self) -> int:
        return (self.epoch_samples - self.start) // self.world

    def __iter__(self) -> Iterator[Key]:
        self._check_epoch()
        epoch, start = self.epoch, self.start
        self.start = 0
        mine = self.order(epoch)[start + self.rank : self.epoch_samples : self.world]
        return ((int(i), epoch) for i in mine.tolist())


class TrainSampler(GlobalOrder):
    """A seeded permutation per epoch (torch's DistributedSampler draws the same one: seed + epoch)."""

    def __init__(self, n: int, ctx: DistContext, seed: int, global_batch: int = 0, shuffle: bool = True):
        super().__init__(n, ctx, global_batch or ctx.world_size)
        self.seed = entropy(seed) & (2**63 - 1)  # seeded with seed + epoch: keep it in range
        self.shuffle = shuffle

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)


class ExactEvalSampler(Sampler[Key]):
    """Rank r takes indices r, r + W, r + 2W, ...: every sample exactly once, no padding."""

    def __init__(self, n: int, ctx: DistContext):
        self.indices = range(ctx.rank, n, ctx.world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Key]:
        return ((i, 0) for i in self.indices)

    def set_epoch(self, epoch: int) -> None:  # evaluation order never changes
        pass


class BalancedSampler(GlobalOrder):
    """Class-balanced sampling: each epoch draws N indices with replacement, weighted by inverse
    class frequency, from a generator seeded by (seed, epoch) only, so the draw is the same at
    every world size; positions are sharded as for every ``GlobalOrder``.
    """

    def __init__(self, targets: np.ndarray, ctx: DistContext, seed: int, global_batch: int = 0):
        super().__init__(len(targets), ctx, global_batch or ctx.world_size)
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.float64)
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, SAMPLER, epoch))
        return torch.multinomial(self.weights, self.n, replacement=True, generator=g)
