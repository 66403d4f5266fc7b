"""The stop vote: every rank stops at the same step on a signal, without a collective of its own.

Why not a blocking all-reduce of the stop flag per step: on gloo that is a round trip the step
waits for (2-4% of a 65 ms CPU step in ``bench overhead``); an asynchronous one, started at a
step's boundary and read at the next, still cost about a point there (the extra collective's
work on a host whose cores the ranks already fill).

Under DDP (every multi-rank train) the flags ride in the gradient all-reduce that runs anyway:
a DDP communication hook appends three counters (SIGHUP, SIGINT, SIGTERM: one-hot, the rank's
own signal) to the first bucket it reduces, and splits them off again. The gradients are
reduced as DDP's own path does (each scaled by 1/world size, then summed; the same bits with 2
ranks; with more, one more element in one bucket may move a ring's chunk boundary, so another
summation order than a run without the hook, and the same in every run with it). Every rank
reads the same counters after the same step's backward, so all stop at that step: the one in
whose backward the signal was seen. Without DDP (a bench's other modes) the flags are
all-reduced asynchronously, started at one boundary and read at the next.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distrib.context import DistContext
from distrib.process_group import all_reduce_max
from distrib.signals import StopRequest

log = logging.getLogger(__name__)
SLOTS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)  # ascending: the highest agreed wins, as MAX did


class StopVote:
    """The run's stop flags: folded into DDP's gradient all-reduce, or one async all-reduce a step."""

    def __init__(self, ctx: DistContext, stop: StopRequest | None):
        self.ctx, self.stop = ctx, stop
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.folded = False  # the flags travel with the gradients (a DDP comm hook)
        self.reduced: torch.Tensor | None = None  # the counters summed in this step's backward

    def fold_into(self, model: nn.Module) -> bool:
        """Carry the vote in ``model``'s gradient all-reduce when it is a multi-rank DDP model."""
        if self.stop is None or not self.ctx.distributed:
            return False
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return False
        model.register_comm_hook(self, fold_hook)
        self.folded = True
        return True

    def flags(self, like: torch.Tensor) -> torch.Tensor:
        """This rank's counters: a 1 in its signal's slot (zeros while no signal came)."""
        out = torch.zeros(len(SLOTS), dtype=like.dtype, device=like.device)
        signum = self.stop.signum if self.stop is not None else 0
        if signum:
            out[SLOTS.index(signum) if signum in SLOTS else -1] = 1
        return out

    def at_step(self) -> bool:
        """At a step boundary: did the ranks vote stop (in this step's backward, or at the last boundary)?"""
        if self.stop is None:
            return False
        if not self.ctx.distributed:
            return self.stop.requested
        if self.folded:
            return self._adopt(self._counted())
        signum = self._read()
        if not signum:
            flag = torch.tensor([float(self.stop.signum)], device=self.ctx.device)
            self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return self._adopt(signum)

    def now(self) -> bool:
        """Agree at once (a blocking all-reduce): before the first step, and at the run's end."""
        if self.stop is None:
            return False
        if not self.ctx.distributed:
            return self.stop.requested
        signum = self._counted() if self.folded else self._read()
        flag = torch.tensor([float(max(signum, self.stop.signum))], device=self.ctx.device)
        return self._adopt(int(all_reduce_max(self.ctx, flag).item()))

    def _counted(self) -> int:
        """The highest signal any rank voted in the last backward (0: none, or no backward since)."""
        if self.reduced is None:
            return 0
        counts, self.reduced = self.reduced.tolist(), None
        return max((int(s) for s, c in zip(SLOTS, counts, strict=True) if c > 0.5), default=0)

    def _read(self) -> int:
        if self.pending is None:
            return 0
        work, flag = self.pending
        self.pending = None
        work.wait()
        return int(flag.item())

    def _adopt(self, signum: int) -> bool:
        assert self.stop is not None
        if signum and not self.stop.requested:
            self.stop.signum = signum  # another rank's signal: exit as it does
        return bool(signum)


def fold_hook(vote: StopVote, bucket):  # no annotations: DDP checks them as objects, not strings
    """DDP's all-reduce of one bucket (a ``dist.GradBucket``; scaled by 1/world, as its own path does),
    with the stop counters appended to bucket 0: the first one reduced in every backward. Returns the
    future of the reduced gradients."""
    grads = bucket.buffer()
    grads.mul_(1.0 / vote.ctx.world_size)
    if bucket.index() != 0:
        return dist.all_reduce(grads, async_op=True).get_future().then(lambda f: f.value()[0])
    n = grads.numel()
    joined = torch.cat([grads, vote.flags(grads)])

    def split(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        out = fut.value()[0]
        vote.reduced = out[n:]
        return out[:n]

    return dist.all_reduce(joined, async_op=True).get_future().then(split)
