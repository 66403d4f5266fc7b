"""Run under torchrun by test_collectives: checks every helper on a real gloo group."""

from __future__ import annotations

import os
import sys

import torch

from distrib.context import DistContext
from distrib.process_group import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast,
    broadcast_object,
    gather_objects,
    process_group,
)


def check_fork_safety() -> None:
    """The fork wait's premise on this torch: gloo's threads are found by name, and go quiet."""
    from distrib import forksafe

    assert forksafe.install() == forksafe.affected()  # the group's start installed it where needed
    names = []
    for tid in forksafe.torch_threads():
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    assert "pt_gloo_runloop" in names, names
    assert forksafe.wait_quiet(max_wait_s=10)  # no collective in flight: they must go to sleep


def main() -> int:
    ctx = DistContext.from_env(os.environ)
    with process_group(ctx, timeout_s=30) as created:
        assert created == ctx.distributed
        w, r = ctx.world_size, ctx.rank
        assert all_reduce_sum(ctx, torch.tensor([r + 1.0])).item() == w * (w + 1) / 2
        assert all_reduce_mean(ctx, torch.tensor([float(r)])).item() == (w - 1) / 2
        assert broadcast(ctx, torch.tensor([r + 10.0]), src=w - 1).item() == w - 1 + 10
        assert broadcast_object(ctx, {"from": r}) == {"from": 0}
        assert gather_objects(ctx, f"r{r}") == [f"r{i}" for i in range(w)]
        barrier(ctx)
        if ctx.distributed:
            check_fork_safety()
    import torch.distributed as dist

    assert not dist.is_initialized()  # torn down on exit
    print(f"collectives ok rank {r}/{w}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
