"""The command line: every command's flags (torchrun's spellings too), their types, and the
split of ``run``/``memcheck``'s argv between our flags and the user's script.

Why apart from launch.py: launch.py dispatches (CUDA variables first, then a job); this module
only says what a command line means. Neither imports torch.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

from distrib.devices import parse_gpu_ids
from distrib.errors import LaunchError

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
    "top",
)
SCRIPT_EPILOG = """\
SCRIPT.py or -m MODULE: the script runs as __main__ in every worker with its own arguments,
untouched (everything from the first positional, -m or -- on is the script's). Its exit code is
the job's; exit 3 from memcheck (or on_leak = fail) is a leak only when the line under the
verdict table says so."""


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


def _endpoint(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port 1-65535; got {text!r}")
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
    _flag(launcher, "rdzv-endpoint", type=_endpoint, metavar="HOST:PORT")
    _flag(launcher, "rdzv-id", default="none", metavar="ID")
    _flag(launcher, "max-restarts", type=_nonneg, default=0, metavar="K")

    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="One entry script for training image classifiers on 1..N GPUs or the CPU.",
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
    top = sub.add_parser(
        "top", parents=[common], help="live per-rank view of a training job (step, phases, memory, flags)"
    )
    top.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN_DIR",
        help="a run directory (default: the newest under run.out_dir)",
    )
    top.add_argument(
        "--once", action="store_true", help="print one snapshot and exit (the default without a terminal)"
    )
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
    bench.add_argument(
        "--warmup", type=int, help="parallel: untimed steps first (10); launch: untimed runs of each side (1)"
    )
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


BENCH_LEAST = {"repeats": 1, "steps": 1, "batch": 1, "size": 1, "nproc": 1, "workers": 0, "warmup": 0}


def check_bench_numbers(args: argparse.Namespace) -> None:
    """Counts that must be positive (or >= 0), refused in one line before anything runs."""
    for name, least in BENCH_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            need = "a positive integer" if least else "an integer >= 0"
            raise LaunchError(f"bench {args.what} --{name} {value}: must be {need}")


def joined_sets(items: list[str]) -> list[str]:
    """``--set -x=1`` as ``--set=-x=1``: argparse takes a value that starts with '-' for a flag and
    answers "expected one argument"; joined, the config names the key that is wrong."""
    out: list[str] = []
    for item in items:
        if out and out[-1] == "--set" and item.startswith("-") and "=" in item:
            out[-1] = f"--set={item}"
        else:
            out.append(item)
    return out


def parse(items: list[str]) -> argparse.Namespace:
    """argparse, except that ``run``/``memcheck`` hand everything from the script on to the script."""
    parser = build_parser()
    items = items[:1] + joined_sets(items[1:]) if items[0] not in ("run", "memcheck") else items
    if items[0] not in ("run", "memcheck"):
        return parser.parse_args(items)
    from distrib.memory.userscript import split_target

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
