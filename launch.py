"""launch.py: one entry script for training image classifiers on 1..N GPUs or the CPU.

The same worker code runs however the process was started::

    # CPU, or one GPU if there is one (one process, no process group)
    python launch.py
    python launch.py train --config configs/default.toml

    # one GPU picked by its nvidia-smi id
    python launch.py train --gpus 1

    # one node, 4 GPUs, torchrun starts the workers
    torchrun --standalone --nproc_per_node 4 launch.py train --gpus 0,1,2,3

    # the same, launch.py starts them through torch's elastic agent
    python launch.py train --nproc-per-node 4 --gpus 0,1,2,3

    # two nodes x 4 GPUs (run on each node; HOST is node 0's address)
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id job1 launch.py train
    python launch.py train --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29400 --rdzv-id job1

    # SLURM: one task per GPU, ranks from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 python launch.py train

    # your own script under the memory monitor (a torchrun drop-in), and the leak check
    python launch.py run --nproc-per-node 4 --gpus 2,3,4,5 my_train.py --lr 0.1
    python launch.py memcheck --nproc-per-node 2 -- my_train.py --lr 0.1

Commands: train (default), eval, check, run, memcheck, organize, stats, preview, cache,
env, config, bench (see README.md). ``--gpus`` sets
CUDA_DEVICE_ORDER=PCI_BUS_ID and CUDA_VISIBLE_DEVICES *before torch is imported*; that
is why this module imports torch only inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from distrib.cli import check_bench_numbers, flag_overrides, normalise_argv, parse
from distrib.config import Config, dump_config, load_config
from distrib.context import resolve_backend, started_as_rank
from distrib.devices import (
    AppliedEnv,
    DevicePlan,
    Inventory,
    apply_device_env,
    parse_gpu_ids,
    plan_devices,
    query_inventory,
)
from distrib.errors import EchoedError, LaunchError
from distrib.logs import check_log_ranks, setup_logging
from distrib.signals import Stopped, TermGuard
from distrib.spawn import SpawnPlan, spawn, strip_launcher_flags

if TYPE_CHECKING:
    from distrib.memory.userscript import Target

log = logging.getLogger("launch")
Job = Callable[..., int]

SCRIPT = str(Path(__file__).resolve())
# configs/ beside launch.py (a checkout, or `pip install -e`), else the copy a plain `pip install`
# puts under <prefix>/share/torchlaunch (the `torchlaunch` command then finds it from any folder)
DEFAULT_CONFIG = next(
    (
        p
        for p in (
            Path(__file__).resolve().parent / "configs" / "default.toml",
            Path(sys.prefix) / "share" / "torchlaunch" / "configs" / "default.toml",
        )
        if p.is_file()
    ),
    Path(__file__).resolve().parent / "configs" / "default.toml",
)

# --------------------------------------------------------------------------- steps


def prepare_devices(cfg: Config, need_inventory: bool) -> tuple[DevicePlan, AppliedEnv, Inventory]:
    """Plan and apply CUDA_DEVICE_ORDER / CUDA_VISIBLE_DEVICES. Must run before torch loads."""
    gpus = parse_gpu_ids(cfg.launch.gpus)
    inventory = query_inventory() if (gpus or need_inventory) else Inventory()
    plan = plan_devices(gpus, os.environ, inventory)
    if not (gpus or need_inventory):
        plan = DevicePlan(plan.gpus, plan.env, plan.notes, None)  # unknown: torch will tell
    applied = apply_device_env(plan)
    for note in plan.notes:
        log.info("%s", note)
    return plan, applied, inventory


def spawn_plan(args: argparse.Namespace, cfg: Config, plan: DevicePlan, inv: Inventory) -> SpawnPlan:
    """Resolve --nproc-per-node and check it against the visible GPUs before spawning."""
    visible = plan.visible_count if plan.visible_count is not None else inv.count
    spec = args.nproc_per_node
    if spec == "gpu" and visible == 0:
        raise LaunchError(f"--nproc-per-node gpu: no GPU is visible ({inv.describe()}); use a number")
    cpus = os.cpu_count() or 1
    n = {"gpu": visible, "cpu": cpus, "auto": visible or cpus}.get(spec) or int(spec)
    backend = resolve_backend(cfg.dist.backend, visible)
    if backend == "nccl" and n > visible:
        raise LaunchError(
            f"--nproc-per-node {n} starts {n} processes but only {visible} GPU(s) are visible "
            f"({'--gpus ' + ','.join(map(str, plan.gpus)) if plan.gpus else inv.describe()}); "
            "nccl needs one GPU per process. Lower --nproc-per-node or list more --gpus."
        )
    if args.nnodes.isdigit():
        check_log_ranks(cfg.launch.log_ranks, n * int(args.nnodes))
    if backend == "gloo" and visible == 0 and n > cpus:
        log.warning(
            "--nproc-per-node %d starts %d CPU processes on %d CPU core(s) (plus data.num_workers=%d "
            "loader processes each): they will share the cores and each holds its own copy of the "
            "model and data in memory; %d or fewer is faster on this machine",
            n,
            n,
            cpus,
            cfg.data.num_workers,
            cpus,
        )
    return SpawnPlan(
        n,
        args.nnodes,
        args.node_rank,
        args.master_addr,
        args.master_port,
        args.rdzv_endpoint,
        args.rdzv_id,
        args.max_restarts,
        rejoin_s=cfg.dist.timeout_s,
    )


def worker_argv(args: argparse.Namespace, argv: list[str], cfg: Config, name: str) -> list[str]:
    """The spawned workers' command line: ours without launcher flags, then the script's untouched.

    The run directory's ``name`` is fixed here, so every rank and every restart of the elastic
    agent writes to the same one (a restarted ``train`` resumes from its checkpoints).
    """
    target = getattr(args, "target", None)
    ours = strip_launcher_flags(argv if target is None else args.ours)
    if not cfg.run.name:
        ours += ["--set", f"run.name={name}"]
    return ours if target is None else ours + target_argv(target)


def target_argv(target: Target) -> list[str]:
    if not (target.script or target.module):
        return []
    return (["-m", target.module] if target.module else ["--", target.script]) + list(target.args)


def run_job(args: argparse.Namespace, argv: list[str], cfg: Config) -> int:
    """Worker (under torchrun/SLURM/alone) or launcher (with --nproc-per-node)."""
    nproc = getattr(args, "nproc_per_node", None)
    spawning = nproc is not None and not started_as_rank(os.environ)
    if cfg.run.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS reads it when CUDA starts
    plan, applied, inventory = prepare_devices(cfg, need_inventory=spawning)
    if spawning:
        from distrib.worker import run_dir_name

        name = run_dir_name(cfg, args.command)
        run_dir = str(Path(cfg.run.out_dir) / name)
        sp = dataclasses.replace(spawn_plan(args, cfg, plan, inventory), run_dir=run_dir)
        return spawn(sp, SCRIPT, worker_argv(args, argv, cfg, name))
    if nproc is not None:
        log.warning("--nproc-per-node ignored: this process is already a rank (torchrun)")
    elif ignored := launcher_flags_given(args):
        log.warning("%s ignored: launcher flags act only with --nproc-per-node", ", ".join(ignored))
    own_group = not (getattr(args, "target", None) and (args.target.script or args.target.module))
    term = None if own_group else TermGuard(armed=False).install()  # before torch loads
    from distrib.worker import run_recorded, run_worker

    job = job_for(args, applied, term)  # imports torch: only now, after the CUDA variables are set
    if not own_group:
        _RAN_USER_CODE.append(True)
    return run_recorded(lambda: run_worker(cfg, plan, args.command, job, own_group))


def launcher_flags_given(args: argparse.Namespace) -> list[str]:
    """Launcher flags set away from their defaults (they do nothing without --nproc-per-node)."""
    defaults = {"nnodes": "1", "node_rank": 0, "master_addr": None, "master_port": None,
                "rdzv_endpoint": None, "rdzv_id": "none", "max_restarts": 0}  # fmt: skip
    return [f"--{k.replace('_', '-')}" for k, d in defaults.items() if getattr(args, k, d) != d]


def job_for(args: argparse.Namespace, applied: AppliedEnv, term: TermGuard | None = None) -> Job:
    """The worker function of a command (imported late: torch loads only after the CUDA env)."""
    import functools

    if args.command == "stats":
        from datasets.commands import stats_job

        return functools.partial(stats_job, data_dir=args.data, resize=args.resize, as_json=args.json)
    if args.command == "cache":
        from datasets.commands import cache_job

        return cache_job
    if args.command == "preview":
        from datasets.commands import preview_job

        return functools.partial(preview_job, out=args.out)
    if args.command == "eval":
        from distrib.engine.evaluate import eval_job

        return functools.partial(eval_job, checkpoint=args.checkpoint, data_dir=args.data)
    if args.command == "check":
        from distrib.check import check_job

        return functools.partial(check_job, applied=applied)
    if args.command in ("run", "memcheck"):
        from distrib.memory import userscript

        if args.target.script or args.target.module:
            steps = args.steps if args.command == "memcheck" else None
            return functools.partial(userscript.script_job, target=args.target, max_steps=steps, term=term)
        return functools.partial(userscript.memcheck_job, steps=args.steps or userscript.MEMCHECK_STEPS)
    from distrib.engine.train import train_job

    return train_job


def run_organize(args: argparse.Namespace) -> int:
    """``organize``: no torch, no workers; the class table goes to stdout."""
    from datasets.organize import LabelCsv, class_table, organize
    from distrib import signals

    signals.install()  # SIGTERM/SIGINT: stop between two files and say how far it got

    plan = organize(
        LabelCsv(args.csv, args.file_col, args.label_col),
        args.images,
        args.out,
        mode=args.mode,
        dry_run=args.dry_run,
        allow_missing=args.allow_missing,
    )
    sys.stdout.write(class_table(plan) + "\n")
    return 0


BENCH_DEFAULTS = {
    "launch": {"repeats": 5, "warmup": 1},
    "data": {"repeats": 5, "batch": 8, "size": 1024},
    "overhead": {"repeats": 4, "steps": 120, "batch": 32, "size": 64},
    "parallel": {"steps": 50, "warmup": 10},
}


def run_bench(args: argparse.Namespace, cfg: Config) -> int:
    """``bench launch|data|overhead|parallel``: each benchmark module gets plain arguments."""
    from distrib.bench.toolkit import bench_dir

    check_bench_numbers(args)
    out = bench_dir(cfg.run.out_dir, cfg.run.name, args.what)
    opt = {k: v if (v := getattr(args, k)) is not None else d for k, d in BENCH_DEFAULTS[args.what].items()}
    if args.what == "launch":
        from distrib.bench import startup

        return startup.main(out, args.nproc, opt["repeats"], opt["warmup"])
    if args.what == "data":
        from distrib.bench import data

        return data.main(out, args.data, opt["repeats"], args.workers, opt["batch"], opt["size"])
    if args.what == "parallel":
        from distrib.bench import parallel

        cpu = parallel.visible_gpus() == 0  # a CPU step at GPU sizes takes seconds: smaller defaults
        options = {"model": args.model, "batch": args.batch_per_gpu or (16 if cpu else 32),
                   "image_size": args.image_size or (64 if cpu else 224),
                   "steps": opt["steps"], "warmup": opt["warmup"], "amp": args.amp,
                   "config": str(Path(args.config).resolve()) if args.config else ""}  # fmt: skip
        return parallel.main(out, [m for m in args.modes.split(",") if m], args.nproc_per_node, options)
    from distrib.bench import overhead

    return overhead.main(out, opt["repeats"], opt["steps"], opt["batch"], opt["size"])


def command_config(args: argparse.Namespace, cfg: Config) -> Config:
    """run: the monitor always on; memcheck: on and failing (our job: ``--steps`` steps, no checkpoints)."""
    if args.command not in ("run", "memcheck"):
        return cfg
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, enabled=True))
    if args.command == "run":
        return cfg
    if args.target.script or args.target.module:
        return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, on_leak="fail"))
    from distrib.memory.userscript import MEMCHECK_STEPS, memcheck_config

    return memcheck_config(cfg, args.steps or MEMCHECK_STEPS)


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = command_config(args, load_config(path, [*args.set, *flag_overrides(args)]))
    setup_logging(None, cfg.launch.log_ranks)
    if args.command == "config":
        sys.stdout.write(dump_config(cfg))
        return 0
    if args.command == "env":
        _, applied, inventory = prepare_devices(cfg, need_inventory=True)
        from distrib.envinfo import main_env

        return main_env(inventory, applied, args.json)
    if args.command == "organize":
        return run_organize(args)
    if args.command == "top":
        from distrib.top import main_top

        return main_top(args.run_dir, cfg.run.out_dir, args.once)
    if args.command == "bench":
        prepare_devices(cfg, need_inventory=False)
        return run_bench(args, cfg)
    return run_job(args, argv, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, apply the CUDA environment, dispatch; user errors exit 2 without a traceback."""
    setup_logging(None)
    try:
        items = normalise_argv(sys.argv[1:] if argv is None else argv)
        args = parse(items)
        return run_command(args, items)
    except LaunchError as e:
        (log.debug if isinstance(e, EchoedError) else log.error)("%s", e)
        return 2
    except Stopped as e:  # SIGTERM/SIGINT: the run stopped at a step boundary, its checkpoint written
        log.warning("%s", e)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (eval, stats, organize...): one line, not a traceback
        log.warning("interrupted (SIGINT)")
        return 128 + signal.SIGINT


_RAN_USER_CODE: list[bool] = []  # set when this process ran a user's script (run, memcheck -- SCRIPT)


def entry() -> None:
    """``python launch.py`` and the ``torchlaunch`` command: main(), then a quick exit.

    Why not a plain ``sys.exit``: tearing the interpreter down after torch and torchvision
    (which imports torch._dynamo) costs 0.5-1.1 s per process, paid by the launcher and every
    rank of every job. Everything of ours is written and closed by then, so the process flushes
    its streams and logs and leaves with ``os._exit``. A user's script keeps the ordinary exit:
    its atexit handlers (an experiment tracker's upload, say) must run.
    """
    code = main()
    if _RAN_USER_CODE:
        sys.exit(code)
    quick_exit(code)


def quick_exit(code: int) -> NoReturn:
    """End this process now, as the interpreter's exit would have left things: children ended,
    logs and streams flushed; then ``os._exit``."""
    end_children()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


def end_children() -> None:
    """What the interpreter's exit would have done for us: end the DataLoader workers an error left
    running (multiprocessing's atexit handler terminates and joins them), so none outlives us."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    children = mp.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)


if __name__ == "__main__":
    entry()
