"""Samplers that know the epoch, shard exactly, and balance classes across ranks.

Every sampler yields ``(index, epoch)`` keys: the dataset seeds an item's augmentation
from (seed, epoch, index), never from worker or rank state, so what sample i looks
like in epoch e does not depend on num_workers or the world size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

from distrib.context import DistContext
from distrib.seeding import SAMPLER, derive_seed, entropy

Key = tuple[int, int]


class _Len(Sized):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


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


class TrainSampler(_EpochGuard, DistributedSampler):
    """torch's DistributedSampler (seeded shuffle, stride sharding) yielding (index, epoch).

    ``drop_last=True`` trims the tail to a multiple of the world size, so ranks see
    disjoint samples and step k's batches across ranks are exactly the 1-rank batch.
    """

    def __init__(self, n: int, ctx: DistContext, seed: int, shuffle: bool = True):
        DistributedSampler.__init__(
            self,
            _Len(n),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=shuffle,
            seed=entropy(seed) & (2**63 - 1),  # it seeds with seed + epoch: keep it in range
            drop_last=ctx.world_size > 1,
        )
        self.start = 0  # resume mid-epoch: skip this many of the epoch's items, once

    def skip_once(self, items: int) -> None:
        """The next iteration starts ``items`` into the epoch's order (exact mid-epoch resume)."""
        self.start = items

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[Key]:  # type: ignore[override]
        self._check_epoch()
        epoch, start = self.epoch, self.start
        self.start = 0
        keys = list(DistributedSampler.__iter__(self))[start:]
        return ((int(i), epoch) for i in keys)


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


class BalancedSampler(_EpochGuard, Sampler[Key]):
    """Class-balanced sampling for N ranks from one global draw.

    Each epoch draws ceil(N / W) * W indices with replacement, weighted by inverse class
    frequency, from a generator seeded by (seed, epoch) only, so every rank draws the
    same list; rank r then takes every W-th element from r.
    """

    def __init__(self, targets: np.ndarray, ctx: DistContext, seed: int):
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.float64)
        self.total = math.ceil(len(targets) / ctx.world_size) * ctx.world_size
        self.rank, self.world, self.seed, self.epoch = ctx.rank, ctx.world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self) -> Iterator[Key]:
        self._check_epoch()
        g = torch.Generator().manual_seed(derive_seed(self.seed, SAMPLER, self.epoch))
        draw = torch.multinomial(self.weights, self.total, replacement=True, generator=g)
        epoch = self.epoch
        return ((int(i), epoch) for i in draw[self.rank :: self.world].tolist())
