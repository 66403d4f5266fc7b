"""The ``check`` job: prove the wiring of a job before training on it.

Every rank all-reduces ``rank + 1`` and checks the sum, writes what it saw (its ranks,
the CUDA variables as CUDA reads them, whether they were set before torch loaded) to
``runs/<name>/ranks/rank<N>.json``, and rank 0 writes ``summary.json``. Run it with the
same launcher and flags as the training job (``--nproc-per-node``, torchrun, srun).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from distrib.config import Config
from distrib.context import DistContext
from distrib.devices import AppliedEnv
from distrib.errors import LaunchError
from distrib.process_group import all_reduce_sum, gather_objects

log = logging.getLogger(__name__)


def rank_report(ctx: DistContext, applied: AppliedEnv, total: float) -> dict[str, object]:
    """What this rank saw: its place in the job and the CUDA variables as CUDA reads them."""
    return {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "world_size": ctx.world_size,
        "local_world_size": ctx.local_world_size,
        "node_rank": ctx.node_rank,
        "backend": ctx.backend,
        "device": ctx.device,
        "launcher": ctx.launcher,
        "pid": os.getpid(),
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")},
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_env_applied_before_torch_import": not applied.torch_loaded_before,
        "all_reduce": total,
    }


def check_job(ctx: DistContext, cfg: Config, run_dir: Path, *, applied: AppliedEnv) -> int:
    """Spine check: all-reduce, per-rank report, summary on rank 0."""
    start = time.perf_counter()
    value = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    total = float(all_reduce_sum(ctx, value).item())
    expected = ctx.world_size * (ctx.world_size + 1) / 2
    if total != expected:
        raise LaunchError(f"all-reduce returned {total}, expected {expected}: the backend is broken")
    report = rank_report(ctx, applied, total)
    (run_dir / "ranks").mkdir(exist_ok=True)
    (run_dir / "ranks" / f"rank{ctx.rank}.json").write_text(json.dumps(report, indent=2))
    reports = gather_objects(ctx, report)
    if ctx.is_main:
        summary = {
            "world_size": ctx.world_size,
            "all_reduce": total,
            "expected": expected,
            "seconds": time.perf_counter() - start,
            "ranks": reports,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "world_size=%d all_reduce(rank+1)=%g (expected %g); run dir %s",
            ctx.world_size,
            total,
            expected,
            run_dir,
        )
    return 0
