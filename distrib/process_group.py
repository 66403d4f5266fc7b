"""Process-group lifetime and the few collectives the toolkit needs.

Why wrappers at all: torch's defaults hide three traps we want closed for every
command — a missing timeout (a lost rank hangs the job for 30 minutes), a nccl group
that does not know its device (``device_id`` makes init eager and the first barrier
cheap), and a group left alive when a rank raises (the others hang in their next
collective). ``process_group(ctx)`` fixes all three; the collectives are the identity
when there is a single process, so one code path serves 1 and N ranks.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distrib import forksafe
from distrib.context import DistContext
from distrib.errors import LaunchError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")
_STORE: Any = None  # the rendezvous store of the group this process joined (read by the hang diagnosis)


def _store(ctx: DistContext, timeout_s: float) -> Any:
    """The rendezvous store, with keys prefixed by the rendezvous round.

    Under torchrun the workers share the agent's store, and it outlives a restart: without a
    prefix of their own, a restarted round reads the dead round's addresses and cannot form
    its group ("Gloo connectFullMesh failed ... Connection refused"). The round is the one all
    nodes agreed on (our launcher exports it, distrib/membership.py); under plain torchrun it is
    the agent's restart count, which only one node can be sure of.
    """
    from torch.distributed.rendezvous import _create_c10d_store

    store = _create_c10d_store(
        ctx.master_addr, ctx.master_port, ctx.rank, ctx.world_size, timedelta(seconds=timeout_s)
    )
    return dist.PrefixStore(f"launch/round_{ctx.rdzv_round}", store)


def bind_device(ctx: DistContext) -> None:
    """Make ``ctx.device`` this process's current CUDA device (no-op on the CPU).

    Without it, anything a rank allocates on plain "cuda" (and each rank's CUDA context)
    lands on cuda:0, the classic "every process uses memory on GPU 0" symptom.
    """
    if ctx.is_cuda:
        torch.cuda.set_device(torch.device(ctx.device))


def init_process_group(ctx: DistContext, timeout_s: float) -> bool:
    """Join the job's process group (no-op for one process); True when one was created.

    Errors name the rendezvous address, the ranks and the timeout, and say what to check.
    """
    if not ctx.distributed:
        return False
    forksafe.install()  # its threads make a DataLoader's fork hang on older CPythons
    global _STORE
    kwargs: dict[str, Any] = {}
    if ctx.backend == "nccl":
        kwargs["device_id"] = torch.device(ctx.device)  # eager init, no device guessing
    try:
        _STORE = _store(ctx, timeout_s)
        dist.init_process_group(
            backend=ctx.backend,
            store=_STORE,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        barrier(ctx)
    except (RuntimeError, ValueError) as e:
        destroy_process_group()
        hint = " (under SLURM, start every task with srun)" if ctx.launcher == "slurm" else ""
        raise LaunchError(
            f"rank {ctx.rank} of {ctx.world_size} could not form the {ctx.backend} process group "
            f"at {ctx.master_addr}:{ctx.master_port} within dist.timeout_s={timeout_s:g}s: "
            f"{first_line(e)}. Check that all {ctx.world_size} ranks started{hint}, that "
            f"{ctx.master_addr} is reachable from this host and the port is open, or raise "
            "--set dist.timeout_s."
        ) from e
    log.debug("process group up: %s rank %d/%d", ctx.backend, ctx.rank, ctx.world_size)
    return True


def rendezvous_store() -> Any:
    """The store the current group was formed on (None before ``init_process_group`` or after destroy)."""
    return _STORE


def destroy_process_group() -> None:
    """Tear down the default group if one exists (safe to call more than once)."""
    global _STORE
    _STORE = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(ctx: DistContext, timeout_s: float) -> Iterator[bool]:
    """``with process_group(ctx, t):`` init + barrier on entry, destroy on every exit path.

    On a clean exit, objects that hold the group (DDP reducers, FSDP hooks) are collected and
    every rank meets at a barrier before the group goes: destroying it under a peer's
    in-flight work aborts a rank now and then on gloo ("terminate called without an active
    exception"). After an error the group is destroyed at once (a barrier could hang).
    """
    created = init_process_group(ctx, timeout_s)
    try:
        yield created
    except BaseException:
        if created:
            destroy_process_group()
        raise
    if created:
        gc.collect()
        barrier(ctx)
        destroy_process_group()


# --------------------------------------------------------------------------- collectives


def _active(ctx: DistContext) -> bool:
    return ctx.distributed and dist.is_available() and dist.is_initialized()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank; the identity for one process."""
    if not _active(ctx):
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[torch.device(ctx.device).index or 0])
    else:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``tensor``."""
    if _active(ctx):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; returns ``tensor``."""
    if _active(ctx):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (sum then divide: gloo has no AVG)."""
    if _active(ctx):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def broadcast(ctx: DistContext, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``tensor`` from rank ``src``."""
    if _active(ctx):
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(ctx: DistContext, obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not _active(ctx):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(ctx: DistContext, obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not _active(ctx):
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
