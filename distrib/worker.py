"""The one worker code path, whoever started the process.

torchrun, our own elastic-agent spawn, SLURM's ``srun`` and a bare ``python launch.py``
all end here: build the frozen context from the environment, check that CUDA sees the
GPUs that were planned, join the process group, make the shared run directory, run the
job, and always tear the group down.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distrib import forksafe, signals
from distrib.config import Config, dump_config
from distrib.context import DistContext
from distrib.devices import DevicePlan, verify_cuda_visibility
from distrib.errors import LaunchError
from distrib.logs import check_log_ranks, setup_logging
from distrib.process_group import bind_device, broadcast_object, process_group

log = logging.getLogger(__name__)

Job = Callable[[DistContext, Config, Path], int]  # (context, config, run directory) -> exit status


def cuda_device_count() -> int:
    """CUDA devices this process may use; 0 when torch has no usable CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def build_context(cfg: Config, plan: DevicePlan) -> DistContext:
    """Check CUDA visibility against the plan, then read the environment once."""
    count = cuda_device_count()
    verify_cuda_visibility(plan, count)
    return DistContext.from_env(os.environ, backend=cfg.dist.backend, cuda_device_count=count)


def run_dir_name(cfg: Config, command: str) -> str:
    """The configured name, else '<yyyymmdd-hhmmss>-<command>-<4 hex>' (unique per start)."""
    return cfg.run.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{secrets.token_hex(2)}"


RUN_OUTPUTS = ("metrics.csv", "steps.csv", "summary.json")  # a train run's own files


def earlier_run(cfg: Config, path: Path) -> list[str]:
    """Files of an earlier training run in ``path`` (and its checkpoint folder)."""
    found = [name for name in RUN_OUTPUTS if (path / name).exists()]
    folder = cfg.checkpoint.folder(path)
    ckpts = [*folder.glob("ckpt-*.pt"), *folder.glob("best.pt")] if folder.is_dir() else []
    return found + ([f"{len(ckpts)} checkpoint(s) in {folder}"] if ckpts else [])


def claim_run_dir(cfg: Config, path: Path, command: str = "train") -> str | None:
    """A new run may not mix with an earlier training run in the same directory.

    Returns the refusal (None = go ahead). A training run may continue (``checkpoint.resume``)
    or, with ``run.overwrite``, remove the earlier run's files first: the run directory and
    the checkpoints in ``checkpoint.dir``. Other commands never write into a training run.
    """
    found = earlier_run(cfg, path)
    if not found or (command == "train" and cfg.checkpoint.resume):
        return None
    if command != "train":
        return (
            f"run directory {path} holds a training run ({', '.join(found)}); `{command}` would "
            "overwrite its config.toml and mix its files. Give this command another run.name"
        )
    if not cfg.run.overwrite:
        return (
            f"run directory {path} already holds a run ({', '.join(found)}); a new run there would "
            "mix the two. Continue it with --resume auto, choose another run.name, or set "
            "run.overwrite = true (--set run.overwrite=true) to delete the old run's files first"
        )
    log.warning("run.overwrite = true: removing the earlier run in %s", path)
    if path.exists():
        shutil.rmtree(path)
    folder = cfg.checkpoint.folder(path)
    for old in [*folder.glob("ckpt-*.pt"), folder / "best.pt"] if folder.is_dir() else []:
        old.unlink(missing_ok=True)
    return None


def make_run_dir(ctx: DistContext, cfg: Config, command: str) -> Path:
    """Rank 0 names and claims the run directory; every rank gets the same one."""
    name = broadcast_object(ctx, run_dir_name(cfg, command) if ctx.is_main else None)
    path = Path(cfg.run.out_dir) / name
    try:
        refusal = claim_run_dir(cfg, path, command) if ctx.is_main else None
        refusal = broadcast_object(ctx, refusal)
        if refusal:
            raise LaunchError(refusal)
        path.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            (path / "config.toml").write_text(dump_config(cfg))
    except OSError as e:
        raise LaunchError(
            f"cannot write the run directory {path}: {e.strerror}. "
            "Point run.out_dir at a writable folder (--set run.out_dir=/path)."
        ) from e
    return path


def script_run_dir(ctx: DistContext, cfg: Config, command: str) -> Path:
    """The run directory of a user's script: named alike on every rank without a collective."""
    from distrib.memory.userscript import run_name

    path = Path(cfg.run.out_dir) / run_name(cfg, dict(os.environ))
    refusal = claim_run_dir(cfg, path, command)  # every rank reads the same files: the same answer
    if refusal:
        raise LaunchError(refusal)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            (path / "config.toml").write_text(dump_config(cfg))
    except OSError as e:
        raise LaunchError(f"cannot write the run directory {path}: {e.strerror}; set run.out_dir") from e
    return path


def after_restart(ctx: DistContext, cfg: Config, command: str) -> Config:
    """A worker the elastic agent restarted continues the run: ``train`` resumes from the newest
    valid checkpoint of the same run directory (the launcher fixed its name before spawning)."""
    if (ctx.restart == 0 and ctx.rdzv_round == 0) or command != "train" or cfg.checkpoint.resume:
        return cfg
    why = f"restart {ctx.restart}" if ctx.restart else f"rendezvous round {ctx.rdzv_round}"
    log.warning("%s: resuming from the newest valid checkpoint (checkpoint.resume = auto)", why)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))


def die_with_agent(ctx: DistContext) -> None:
    """A rank started by an elastic agent (ours or torchrun) gets SIGHUP when the agent dies.

    Without it a SIGKILLed launcher leaves its ranks (each in a session of its own) training
    on with nobody watching. SIGHUP, not SIGTERM: the kernel sends it once per exiting thread
    of the agent, and only repeats of SIGHUP are not taken for an impatient second signal.
    Linux only; elsewhere nothing changes.
    """
    if ctx.launcher == "torchrun":
        signals.die_with_parent(signals.AGENT_GONE)


def run_worker(cfg: Config, plan: DevicePlan, command: str, job: Job, own_group: bool = True) -> int:
    """Run ``job`` as this process's rank; returns the exit status.

    ``own_group=False``: the job is a user's script that makes its own process group.
    """
    ctx = build_context(cfg, plan)
    die_with_agent(ctx)
    check_log_ranks(cfg.launch.log_ranks, ctx.world_size)
    setup_logging(ctx.rank, cfg.launch.log_ranks)
    cfg = after_restart(ctx, cfg, command)
    log.info(
        "%s: rank %d/%d (local %d/%d, node %d) on %s, backend %s",
        ctx.launcher,
        ctx.rank,
        ctx.world_size,
        ctx.local_rank,
        ctx.local_world_size,
        ctx.node_rank,
        ctx.device,
        ctx.backend,
    )
    if not own_group:
        forksafe.install()  # the script's own process group and DataLoaders: the same fork hazard
        return job(ctx, cfg, script_run_dir(ctx, cfg, command))
    bind_device(ctx)
    with process_group(ctx, cfg.dist.timeout_s):
        run_dir = make_run_dir(ctx, cfg, command)
        try:
            return job(ctx, cfg, run_dir)
        except LaunchError:
            if ctx.is_main:
                drop_if_bare(run_dir)
            raise


def drop_if_bare(run_dir: Path) -> None:
    """A start refused before it wrote anything leaves no run directory holding only config.toml
    (they pile up, and look like runs). Anything else in it, and it stays."""
    try:
        if [p.name for p in run_dir.iterdir()] == ["config.toml"]:
            (run_dir / "config.toml").unlink()
            run_dir.rmdir()  # fails, harmlessly, if another rank wrote a file meanwhile
    except OSError:
        pass


def run_recorded(fn: Callable[[], int]) -> int:
    """Under torch's elastic agent, record an exception in the error file the agent reads."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return fn()
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)()
