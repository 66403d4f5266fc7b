"""Before training: processes on our GPUs that are not ours, usually leftovers of a crashed run.

They hold memory our ranks will miss, and they make NVML's device figures move for
reasons of their own; say so before the first step (or refuse, memory.require_free).
"""

from __future__ import annotations

import logging
import os

from distrib.config import MemorySection
from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


def cuda_index(ctx: DistContext) -> int | None:
    """The torch CUDA index of this rank's device, or None on the CPU."""
    if not ctx.is_cuda:
        return None
    return int(ctx.device.split(":")[1]) if ":" in ctx.device else 0


def job_pids(own: set[int]) -> set[int]:
    """Our processes: the given ranks, this process's parent (the elastic agent) and its children."""
    pids = set(own) | {os.getpid(), os.getppid()}
    try:
        import psutil

        pids |= {c.pid for c in psutil.Process(os.getppid()).children(recursive=True)}
    except Exception:  # psutil missing, or the parent is gone: the ranks we know are enough
        pass
    return pids


def preflight_gpu(ctx: DistContext, settings: MemorySection, ranks: set[int]) -> None:
    """Warn about (or refuse, with memory.require_free) foreign processes on this rank's GPU."""
    index = cuda_index(ctx)
    if index is None:
        return
    from distrib.memory.probe import foreign_gpu_processes

    try:
        foreign = foreign_gpu_processes(index, job_pids(ranks))
    except Exception as e:  # no NVML: the monitor says so once; nothing to check here
        log.debug("GPU preflight skipped: %s", e)
        return
    if not foreign:
        return
    listed = "; ".join(f"pid {pid} ({mem / 2**20:.0f} MiB): {cmd[:80]}" for pid, mem, cmd in foreign[:5])
    text = (
        f"{len(foreign)} process(es) that are not this job's hold memory on {ctx.device} (rank {ctx.rank}): "
        f"{listed}"
    )
    if settings.require_free:
        raise LaunchError(f"{text}. memory.require_free = true: stop them or choose other --gpus")
    log.warning("%s; set memory.require_free = true to refuse such GPUs", text)
