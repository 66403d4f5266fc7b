"""The global batch across world sizes (the split rule, refusals) and the sample ledger's verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasets.ledger import Ledger, check, violation
from distrib.config import load_config
from distrib.context import DistContext
from distrib.engine.elastic import apply, change_line, plan_batches, saved_plan, split, world_sizes_for
from distrib.errors import LaunchError

pytestmark = pytest.mark.timeout(60)


def ctx(world: int, nodes: int = 1) -> DistContext:
    return DistContext(rank=0, world_size=world, local_world_size=world // nodes, nodes=nodes)


def test_the_split_keeps_the_global_batch_with_the_largest_per_rank_batch_allowed() -> None:
    assert split(64, 2, 32) == (32, 1)
    assert split(64, 1, 32) == (32, 2)  # 2 ranks -> 1: accumulate twice
    assert split(64, 4, 32) == (16, 1)
    assert split(48, 1, 32) == (24, 2)  # the largest divisor of 48 that fits 32
    assert split(7, 1, 4) == (1, 7)  # a prime share: one image at a time
    assert split(96, 5, 32) is None
    for g in (1, 12, 60, 64, 96):
        for w in world_sizes_for(g):
            b, a = split(g, w, 16)  # type: ignore[misc]
            assert b * a * w == g and b <= 16


def test_a_fresh_run_takes_batch_x_ranks_x_accum_or_train_global_batch() -> None:
    cfg = load_config(None, ["data.batch_size=8", "train.accum_steps=2"])
    plan = plan_batches(cfg, ctx(2))
    assert (plan.global_batch, plan.per_rank, plan.accum) == (32, 8, 2)
    cfg = load_config(None, ["data.batch_size=8", "train.global_batch=48"])
    plan = plan_batches(cfg, ctx(2))
    assert (plan.global_batch, plan.per_rank, plan.accum) == (48, 8, 3)
    applied = apply(cfg, plan)
    assert applied.data.batch_size == 8 and applied.train.accum_steps == 3 and applied.model == cfg.model


def test_a_checkpoints_global_batch_wins_and_an_impossible_world_size_is_refused_naming_the_fix() -> None:
    cfg = load_config(None, ["data.batch_size=32"])
    plan = plan_batches(cfg, ctx(1), 64, "checkpoint x.pt")
    assert (plan.global_batch, plan.per_rank, plan.accum) == (64, 32, 2)
    with pytest.raises(LaunchError) as e:
        plan_batches(load_config(None, ["data.batch_size=32"]), ctx(3), 64, "checkpoint x.pt")
    msg = str(e.value)
    assert "checkpoint x.pt's global batch 64 cannot be split over 3 ranks" in msg
    assert "world sizes that keep it: 1, 2, 4, 8, 16, 32, 64" in msg and "resume on one of those" in msg
    with pytest.raises(
        LaunchError, match="train.global_batch = 32, but checkpoint x.pt trained with global batch 64"
    ):
        plan_batches(load_config(None, ["train.global_batch=32"]), ctx(2), 64, "checkpoint x.pt")
    with pytest.raises(
        LaunchError, match="global batch 96 cannot be split over 5 ranks.*set train.global_batch"
    ):
        plan_batches(load_config(None, ["train.global_batch=96"]), ctx(5))
    with pytest.raises(LaunchError, match="holds no global batch .*earlier version"):
        saved_plan({"model": {}}, Path("old.pt"))


def test_the_change_line_says_what_changed() -> None:
    state = {"world_size": 2, "nodes": 2, "progress": {"epoch": 2, "samples_in_epoch": 320}}
    plan = plan_batches(load_config(None, ["data.batch_size=32"]), ctx(1), 64, "c")
    line = change_line(state, ctx(1), plan, 768)
    assert line == (
        "world size 2 -> 1 (1 node(s) left): resuming at epoch 3, sample 320 of 768, global batch 64 kept "
        "(per-rank batch 32, accumulation 2)"
    )
    assert change_line(state | {"nodes": 1}, ctx(4, nodes=2), plan, 768).startswith(  # type: ignore[arg-type]
        "world size 2 -> 4 (1 node(s) joined)"
    )
    assert change_line(state, ctx(2, nodes=2), plan, 768) is None


def test_the_ledger_counts_what_was_delivered_and_names_repeats_and_misses() -> None:
    order = torch.tensor([3, 0, 4, 1, 2, 5])
    ranks = [Ledger(6), Ledger(6)]
    ranks[0].add(order[0:4:2])
    ranks[1].add(order[1:4:2])
    total = ranks[0].counts + ranks[1].counts
    ok = check(total, order, 4, epoch=0)
    assert ok.exact and (ok.samples, ok.left_out, ok.repeated, ok.missed) == (4, 2, 0, 0)
    ranks[1].add(torch.tensor([1]))  # a batch replayed after a resume
    bad = check(ranks[0].counts + ranks[1].counts, order, 4, epoch=1)
    assert not bad.exact and (bad.repeated, bad.missed, bad.example) == (1, 0, 1)
    assert "epoch 2: 1 sample(s) trained more often and 0 less often" in str(violation(bad))
    short = check(ranks[0].counts, order, 4, epoch=0)  # rank 1's half never arrived
    assert (short.repeated, short.missed) == (0, 2)
    with_repeats = torch.tensor([1, 1, 2, 0])  # a balanced draw: index 1 twice
    counts = Ledger(4)
    counts.add([1, 1, 2])
    assert check(counts.counts, with_repeats, 3, epoch=0).exact
    with pytest.raises(LaunchError, match="counts 4 training samples, this run has 6"):
        Ledger(6).reset(torch.zeros(4, dtype=torch.int32))
