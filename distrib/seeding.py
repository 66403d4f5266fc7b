"""Seeds derived from (seed, purpose, ...) with numpy's SeedSequence.

Why derived, not ``seed + rank``: adjacent integer seeds give correlated streams in
some generators and collide across purposes (rank 1's worker 0 == rank 0's worker 1 with
``seed + rank + worker``). SeedSequence hashes the whole key, so every (purpose, rank,
worker, epoch, index) gets an independent stream, and the functions here are pure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from distrib import signals

# Seed purposes: one table, so no two uses of run.seed ever share a stream.
SAMPLE = 1  # an item's augmentation in an epoch (datasets/loader.py)
WORKER = 2  # a DataLoader worker's random/numpy/torch state
LOADER = 3  # the DataLoader's own generator, per rank and epoch
SAMPLER = 4  # the balanced sampler's draw, per epoch
INIT = 5  # model initialisation: the same on every rank and world size
STEPS = 6  # the training process's RNG (dropout), per rank
_MASK63 = (1 << 63) - 1


def entropy(seed: int) -> int:
    """``run.seed`` (any 64-bit integer, negative ones too) as the non-negative entropy numpy takes.

    A bijection on 64-bit integers, so distinct configured seeds stay distinct streams.
    """
    return int(seed) % 2**64


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed that depends on ``seed`` and every element of ``key``."""
    state = np.random.SeedSequence(entropy=entropy(seed), spawn_key=tuple(int(k) for k in key))
    return int(state.generate_state(1, np.uint64)[0]) & _MASK63


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed for the random augmentation of dataset item ``index`` in ``epoch``.

    It does not involve rank or worker, so an item is augmented identically whatever
    the number of workers and the world size.
    """
    return derive_seed(seed, SAMPLE, epoch, index)


def worker_seed(seed: int, rank: int, worker: int, epoch: int) -> int:
    """Seed for DataLoader worker ``worker`` of ``rank`` in ``epoch``."""
    return derive_seed(seed, WORKER, rank, worker, epoch)


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the per-rank generator a DataLoader draws its workers' base seed from."""
    return derive_seed(seed, LOADER, rank, epoch)


def seed_process(value: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's default generator."""
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


@dataclass
class WorkerSeeder:
    """``worker_init_fn`` seeding random/numpy/torch per (seed, rank, worker, epoch).

    The epoch is read when a worker starts: the epoch helper updates it before each
    epoch's iterator is created (non-persistent workers start then). With persistent
    workers the streams keep their first epoch's seed; per-item augmentation is seeded
    per (seed, epoch, index) regardless.
    """

    seed: int
    rank: int
    epoch: int = 0

    def __call__(self, worker_id: int) -> None:
        seed_process(worker_seed(self.seed, self.rank, worker_id, self.epoch))
        signals.loader_worker()  # the one hook torch runs in every worker: its signals too
