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
import dataclasses
import difflib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
from distrib.signals import Stopped
from distrib.spawn import SpawnPlan, spawn, strip_launcher_flags

if TYPE_CHECKING:
    from distrib.memory.host import Target

log = logging.getLogger("launch")
Job = Callable[..., int]

COMMANDS = (
    "train",
    "eval",
    "check",
    "run",
    "memcheck",
    "organize",
    "stats",
    "preview",
    "cache",
    "env",
    "config",
    "bench",
)
SCRIPT = str(Path(__file__).resolve())
SCRIPT_EPILOG = """\
SCRIPT.py or -m MODULE: the script runs as __main__ in every worker with its own arguments,
untouched (everything from the first positional, -m or -- on is the script's). Its exit code is
the job's; exit 3 from memcheck (or on_leak = fail) is a leak only when the line under the
verdict table says so."""
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

# --------------------------------------------------------------------------- CLI


def _nproc(text: str) -> str:
    if text in ("gpu", "cpu", "auto"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or gpu, cpu, auto; got {text!r}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535; got {text!r}")
    return int(text)


def _nonneg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return int(text)


def _nnodes(text: str) -> str:
    parts = text.split(":")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX with N >= 1; got {text!r}")
    return text


def _flag(parser: argparse.ArgumentParser, name: str, **kw: object) -> None:
    """Add ``--a-b`` with its torchrun twin ``--a_b``."""
    spellings = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*spellings, **kw)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _flag(common, "config", metavar="FILE", help="TOML config (default: configs/default.toml)")
    _flag(
        common,
        "set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    _flag(common, "gpus", metavar="LIST", help="physical GPU ids in nvidia-smi order, e.g. 0,2")
    _flag(common, "log-ranks", metavar="0|all|LIST", help="ranks whose INFO logs are shown")

    launcher = argparse.ArgumentParser(add_help=False)
    _flag(
        launcher,
        "nproc-per-node",
        type=_nproc,
        metavar="N|gpu|cpu|auto",
        help="start N workers per node through torch's elastic agent",
    )
    _flag(launcher, "nnodes", type=_nnodes, default="1", metavar="N[:M]")
    _flag(launcher, "node-rank", type=_nonneg, default=0, metavar="K")
    _flag(launcher, "master-addr", metavar="HOST")
    _flag(launcher, "master-port", type=_port, metavar="PORT")
    _flag(launcher, "rdzv-endpoint", metavar="HOST:PORT")
    _flag(launcher, "rdzv-id", default="none", metavar="ID")
    _flag(launcher, "max-restarts", type=_nonneg, default=0, metavar="K")

    parser = argparse.ArgumentParser(
        prog="launch.py",
        description=(__doc__ or "").split("\n")[0],
        epilog="Without a command, 'train' runs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    train = sub.add_parser("train", parents=[common, launcher], help="train (default command)")
    train.add_argument("--resume", metavar="auto|PATH", help="continue from a checkpoint (checkpoint.resume)")
    ev = sub.add_parser("eval", parents=[common, launcher], help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a ckpt-*.pt or best.pt written by train")
    ev.add_argument("--data", help="ImageFolder to evaluate on (default: the run's validation split)")
    sub.add_parser(
        "check", parents=[common, launcher], help="all-reduce on every rank and report what each rank sees"
    )
    env = sub.add_parser("env", parents=[common], help="versions, GPU map, NVML, ports, /dev/shm")
    env.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("config", parents=[common], help="print the resolved config as TOML")
    org = sub.add_parser("organize", parents=[common], help="flat images + label CSV -> ImageFolder")
    org.add_argument("--csv", required=True, help="label CSV, e.g. train_df.csv")
    org.add_argument("--images", required=True, help="folder the CSV's file names are relative to")
    org.add_argument("--out", required=True, help="ImageFolder root to fill (one folder per class)")
    _flag(org, "file-col", default="file_name", help="CSV column with file names")
    _flag(org, "label-col", default="label", help="CSV column with labels")
    org.add_argument(
        "--mode",
        default="link",
        choices=["link", "copy", "symlink", "move"],
        help="link (hard link, a copy across file systems), copy, symlink, move",
    )
    _flag(org, "dry-run", action="store_true", help="report what would happen, change nothing")
    _flag(org, "allow-missing", action="store_true", help="organise even if some files are missing")
    stats = sub.add_parser("stats", parents=[common, launcher], help="exact per-channel mean/std")
    stats.add_argument("--data", required=True, help="ImageFolder root or a flat image folder")
    stats.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), help="resize first")
    stats.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser(
        "cache",
        parents=[common, launcher],
        help="decode every image once into the decoded cache (data.cache_dir), with every core",
    )
    prev = sub.add_parser("preview", parents=[common], help="PNG grid of one augmented batch")
    prev.add_argument("--out", help="PNG path (default: runs/<name>/preview.png)")
    run = sub.add_parser(
        "run",
        parents=[common, launcher],
        help="your own script (SCRIPT.py args, or -m module args) under the memory monitor; torchrun drop-in",
        usage="launch.py run [flags] SCRIPT.py [script args...]\n"
        "       launch.py run [flags] -m MODULE [args...]",
        epilog=SCRIPT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(steps=None)
    mem = sub.add_parser(
        "memcheck",
        parents=[common, launcher],
        help="the training job (or -- SCRIPT.py args) with the leak detector set to fail; exit 3 on a leak",
        usage="launch.py memcheck [flags] [--steps N]                 (our training job)\n"
        "       launch.py memcheck [flags] [--steps N] [--] SCRIPT.py [args...]\n"
        "       launch.py memcheck [flags] [--steps N] -m MODULE [args...]",
        epilog=SCRIPT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mem.add_argument("--steps", type=_positive, help="optimizer steps to watch (our job: 300; a script: all)")
    bench = sub.add_parser("bench", parents=[common], help="benchmarks")
    bench.add_argument(
        "what",
        choices=["launch", "data", "overhead", "parallel"],
        help="launch: start-up vs torchrun; data: loader and stats throughput; "
        "overhead: train step time vs a bare DDP loop; parallel: single vs dp vs ddp vs fsdp",
    )
    bench.add_argument("--repeats", type=int, help="rounds (launch, data: 5; overhead: 4 epochs)")
    bench.add_argument("--nproc", type=int, default=2, help="launch: processes")
    bench.add_argument("--data", help="data: an ImageFolder root (e.g. from make_imagefolder.py)")
    bench.add_argument("--workers", type=int, default=2, help="data: DataLoader workers")
    bench.add_argument("--batch", type=int, help="images per batch (data: 8; overhead: 32 per rank)")
    bench.add_argument(
        "--size", type=int, help="data: the recipe's Resize((S, S)), 1024; overhead: image px, 64"
    )
    bench.add_argument(
        "--steps", type=int, help="overhead: step pairs per epoch (120); parallel: timed steps (50)"
    )
    bench.add_argument("--modes", default="single,dp,ddp,fsdp", help="parallel: modes to compare")
    _flag(bench, "nproc-per-node", type=_positive, help="parallel: processes for ddp/fsdp (GPUs, else 2)")
    bench.add_argument("--model", default="small_cnn", help="parallel: model.name (BatchNorm-free small_cnn)")
    _flag(
        bench, "batch-per-gpu", type=_positive, help="parallel: images per device per step (GPU 32, CPU 16)"
    )
    _flag(bench, "image-size", type=_positive, help="parallel: image side in px (GPU 224, CPU 64)")
    bench.add_argument("--warmup", type=int, default=10, help="parallel: untimed steps first")
    bench.add_argument(
        "--amp", choices=["off", "bf16", "fp16"], default="off", help="parallel: precision (CUDA)"
    )
    return parser


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Insert the default command; reject an unknown one with the list and a suggestion."""
    items = list(argv)
    if not items or (items[0].startswith("-") and items[0] not in ("-h", "--help")):
        return ["train", *items]
    if items[0] not in COMMANDS and not items[0].startswith("-"):
        close = difflib.get_close_matches(items[0], COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LaunchError(f"unknown command {items[0]!r}{hint}; commands: {', '.join(COMMANDS)}")
    return items


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags that mirror config keys, as --set items (flags win over --set and files)."""
    out = []
    if args.gpus is not None:
        out.append(f"launch.gpus=[{','.join(str(g) for g in parse_gpu_ids(args.gpus))}]")
    if args.log_ranks is not None:
        out.append(f"launch.log_ranks={args.log_ranks!r}")
    if getattr(args, "resume", None) is not None:
        out.append(f"checkpoint.resume={args.resume!r}")
    return out


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
    from distrib.worker import run_recorded, run_worker

    job = job_for(args, applied)  # imports torch: only now, after the CUDA variables are set
    own_group = not (getattr(args, "target", None) and (args.target.script or args.target.module))
    return run_recorded(lambda: run_worker(cfg, plan, args.command, job, own_group))


def job_for(args: argparse.Namespace, applied: AppliedEnv) -> Job:
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
        from distrib.memory import host

        if args.target.script or args.target.module:
            steps = args.steps if args.command == "memcheck" else None
            return functools.partial(host.script_job, target=args.target, max_steps=steps)
        return functools.partial(host.memcheck_job, steps=args.steps or host.MEMCHECK_STEPS)
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
    "launch": {"repeats": 5},
    "data": {"repeats": 5, "batch": 8, "size": 1024},
    "overhead": {"repeats": 4, "steps": 120, "batch": 32, "size": 64},
    "parallel": {"steps": 50},
}


BENCH_LEAST = {"repeats": 1, "steps": 1, "batch": 1, "size": 1, "nproc": 1, "workers": 0, "warmup": 0}


def check_bench_numbers(args: argparse.Namespace) -> None:
    """Counts that must be positive (or >= 0), refused in one line before anything runs."""
    for name, least in BENCH_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            need = "a positive integer" if least else "an integer >= 0"
            raise LaunchError(f"bench {args.what} --{name} {value}: must be {need}")


def run_bench(args: argparse.Namespace, cfg: Config) -> int:
    """``bench launch|data|overhead|parallel``: each benchmark module gets plain arguments."""
    from distrib.bench.toolkit import bench_dir

    check_bench_numbers(args)
    out = bench_dir(cfg.run.out_dir, cfg.run.name, args.what)
    opt = {k: v if (v := getattr(args, k)) is not None else d for k, d in BENCH_DEFAULTS[args.what].items()}
    if args.what == "launch":
        from distrib.bench import startup

        return startup.main(out, args.nproc, opt["repeats"])
    if args.what == "data":
        from distrib.bench import data

        return data.main(out, args.data, opt["repeats"], args.workers, opt["batch"], opt["size"])
    if args.what == "parallel":
        from distrib.bench import parallel

        cpu = parallel.visible_gpus() == 0  # a CPU step at GPU sizes takes seconds: smaller defaults
        options = {"model": args.model, "batch": args.batch_per_gpu or (16 if cpu else 32),
                   "image_size": args.image_size or (64 if cpu else 224),
                   "steps": opt["steps"], "warmup": args.warmup, "amp": args.amp,
                   "config": str(Path(args.config).resolve()) if args.config else ""}  # fmt: skip
        return parallel.main(out, [m for m in args.modes.split(",") if m], args.nproc_per_node, options)
    from distrib.bench import overhead

    return overhead.main(out, opt["repeats"], opt["steps"], opt["batch"], opt["size"])


def parse(items: list[str]) -> argparse.Namespace:
    """argparse, except that ``run``/``memcheck`` hand everything from the script on to the script."""
    parser = build_parser()
    if items[0] not in ("run", "memcheck"):
        return parser.parse_args(items)
    from distrib.memory.host import split_target

    head, target = split_target(items[1:], value_flags(parser, items[0]))
    args = parser.parse_args([items[0], *head])
    args.target, args.ours = target, [items[0], *head]
    if items[0] == "run" or target.script or target.module:
        target.check()
    return args


def value_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The options of ``command`` that take a value (so the value is not taken for the script)."""
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[union-attr]
    return {s for a in sub.choices[command]._actions if a.nargs != 0 for s in a.option_strings}


def command_config(args: argparse.Namespace, cfg: Config) -> Config:
    """run: the monitor always on; memcheck: on and failing (our job: ``--steps`` steps, no checkpoints)."""
    if args.command not in ("run", "memcheck"):
        return cfg
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, enabled=True))
    if args.command == "run":
        return cfg
    if args.target.script or args.target.module:
        return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, on_leak="fail"))
    from distrib.memory.host import MEMCHECK_STEPS, memcheck_config

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


if __name__ == "__main__":
    sys.exit(main())
