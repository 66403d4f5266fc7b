"""The global batch, kept across world sizes: how a run resumes on any number of ranks.

Why the global batch is the unit: an optimizer step of G samples gives the same update
whether 1 rank accumulates 4 micro-batches of G/4 or 4 ranks take G/4 each (only the
summation order differs). So a run that comes back on another number of ranks keeps G
and changes how it is split; its schedule, warm-up, logging and checkpoint cadence count
optimizer steps of G and do not move.

The rule (README, "Elastic"): on W ranks, with ``data.batch_size`` B as the most a rank may
take at once, the per-rank batch is the largest divisor b of G / W with b <= B, and the
accumulation is G / (W * b). When W does not divide G, no split keeps G: the run is refused
before training, naming the world sizes that work.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.config import Config
from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is split on this world size."""

    global_batch: int
    per_rank: int
    accum: int
    world_size: int

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} (per-rank batch {self.per_rank}, accumulation "
            f"{self.accum}, {self.world_size} rank(s))"
        )


def world_sizes_for(global_batch: int, most: int = 64) -> list[int]:
    """The world sizes (up to ``most``) that can keep ``global_batch``."""
    return [w for w in range(1, min(global_batch, most) + 1) if global_batch % w == 0]


def split(global_batch: int, world: int, most_per_rank: int) -> tuple[int, int] | None:
    """(per-rank batch, accumulation) for ``world`` ranks; None when ``world`` does not divide G."""
    if global_batch % world:
        return None
    share = global_batch // world
    per_rank = max(b for b in range(1, min(share, most_per_rank) + 1) if share % b == 0)
    return per_rank, share // per_rank


def configured_global_batch(cfg: Config, world: int) -> int:
    """train.global_batch, or data.batch_size x ranks x train.accum_steps when it is 0."""
    return cfg.train.global_batch or cfg.data.batch_size * world * cfg.train.accum_steps


def plan_batches(cfg: Config, ctx: DistContext, saved: int | None = None, source: str = "") -> BatchPlan:
    """The split of the run's global batch over this world: ``saved`` (a checkpoint's) wins.

    A checkpoint's G is kept unless ``train.global_batch`` asks for another one, which is
    refused: it would change the optimisation of a run in progress.
    """
    world = ctx.world_size
    asked = cfg.train.global_batch
    if saved and asked and asked != saved:
        raise LaunchError(
            f"train.global_batch = {asked}, but {source} trained with global batch {saved}; a "
            "resumed run keeps its global batch (the optimisation would change): unset "
            "train.global_batch or start a fresh run"
        )
    g = saved or configured_global_batch(cfg, world)
    parts = split(g, world, cfg.data.batch_size)
    if parts is None:
        origin = f"{source}'s global batch" if saved else "global batch"
        works = ", ".join(map(str, world_sizes_for(g)))
        fix = (
            "resume on one of those world sizes"
            if saved
            else f"set train.global_batch to a multiple of {world}"
        )
        raise LaunchError(
            f"{origin} {g} cannot be split over {world} ranks ({g} is not a multiple of {world}); "
            f"world sizes that keep it: {works}; {fix}"
        )
    return BatchPlan(g, parts[0], parts[1], world)


def apply(cfg: Config, plan: BatchPlan) -> Config:
    """The config the run trains with: data.batch_size and train.accum_steps from the plan."""
    data = dataclasses.replace(cfg.data, batch_size=plan.per_rank)
    train = dataclasses.replace(cfg.train, accum_steps=plan.accum)
    return dataclasses.replace(cfg, data=data, train=train)


def saved_plan(state: dict[str, Any], path: Path) -> int:
    """A checkpoint's global batch; checkpoints from before elastic resume have none."""
    g = state.get("global_batch")
    if not isinstance(g, int) or g < 1:
        raise LaunchError(
            f"checkpoint {path} holds no global batch (written by an earlier version of this "
            "launcher, which counted its position in per-rank batches): resume it with that "
            "version, or start a fresh run"
        )
    return g


def change_line(state: dict[str, Any], ctx: DistContext, plan: BatchPlan, epoch_samples: int) -> str | None:
    """The one line a resume at another world size (or number of nodes) prints; None if unchanged."""
    old_world, old_nodes = int(state.get("world_size", 0)), int(state.get("nodes", 0) or 0)
    if old_world == ctx.world_size and (not old_nodes or old_nodes == ctx.nodes):
        return None
    why = ""
    if old_nodes and old_nodes != ctx.nodes:
        left = old_nodes - ctx.nodes
        why = f" ({left} node(s) left)" if left > 0 else f" ({-left} node(s) joined)"
    prog = state["progress"]
    return (
        f"world size {old_world} -> {ctx.world_size}{why}: resuming at epoch {prog['epoch'] + 1}, "
        f"sample {prog['samples_in_epoch']} of {epoch_samples}, global batch {plan.global_batch} "
        f"kept (per-rank batch {plan.per_rank}, accumulation {plan.accum})"
    )
