"""Benchmarks: each one compares against a baseline measured in the same run.

``bench launch``: wall time from starting ``python launch.py check --nproc-per-node N``
until every rank has passed its first barrier and exited, against
``torchrun --standalone --nproc_per_node N`` running a minimal script that does the
same (distrib/bench_minimal.py). Runs alternate A/B/B/A so drift (page cache, thermal,
a neighbour) hits both sides; medians are reported because these machines are noisy.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from distrib.config import Config
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
TARGET_LAUNCH_RATIO = 1.10


def torchrun_cmd() -> list[str]:
    """The ``torchrun`` console script beside this Python, else ``python -m torch.distributed.run``."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def time_command(cmd: Sequence[str], env: dict[str, str]) -> float:
    """Seconds from start to exit; a failing command is an error (its time means nothing)."""
    start = time.perf_counter()
    res = subprocess.run(list(cmd), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise LaunchError(
            f"benchmark command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}"
        )
    return seconds


def summarise(times: dict[str, list[float]], baseline: str) -> list[dict[str, object]]:
    """Median/min/max per variant and the ratio of medians to the baseline."""
    base = statistics.median(times[baseline])
    return [
        {
            "variant": name,
            "runs": len(ts),
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "max_s": max(ts),
            "ratio_vs_" + baseline: statistics.median(ts) / base,
        }
        for name, ts in times.items()
    ]


def bench_launch(nproc: int, repeats: int, scratch: Path) -> dict[str, list[float]]:
    """Alternating timed runs of both start-up paths (one untimed warm-up each)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on gloo/CPU: this measures start-up, not GPUs
    cmds = {
        "torchrun_minimal": [
            *torchrun_cmd(),
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(REPO / "distrib" / "bench_minimal.py"),
        ],
        "launch_py": [
            sys.executable,
            str(REPO / "launch.py"),
            "check",
            "--nproc-per-node",
            str(nproc),
            "--set",
            f"run.out_dir={scratch}",
        ],
    }
    return run_rounds(
        {name: functools.partial(time_command, cmd, env) for name, cmd in cmds.items()}, repeats
    )


def run_rounds(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """One untimed warm-up of each variant, then ``repeats`` rounds in A/B, B/A order."""
    for fn in variants.values():  # page cache, worker start, lazy imports
        fn()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(variants[name]())
            log.info("round %d/%d %-16s %.3f", i + 1, repeats, name, results[name][-1])
    return results


def write_results(
    out: Path, rows: list[dict[str, object]], times: dict[str, list[float]], meta: dict[str, object]
) -> None:
    """bench.csv (every run), bench.json (summary + meta), bench.md (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "bench.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "run", "seconds"])
        for name, ts in times.items():
            w.writerows([name, i, f"{t:.6f}"] for i, t in enumerate(ts))
    (out / "bench.json").write_text(json.dumps({"meta": meta, "summary": rows}, indent=2))
    (out / "bench.md").write_text(markdown_table(rows) + "\n")


def markdown_table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |"
        )
    return "\n".join(lines)


def main_bench(args: argparse.Namespace, cfg: Config) -> int:
    """``launch.py bench launch|data``: run, print the table, write the run directory."""
    if args.repeats < 1 or args.nproc < 1:
        raise LaunchError("--repeats and --nproc must be at least 1")
    name = cfg.run.name or f"{time.strftime('%Y%m%d-%H%M%S')}-bench-{args.what}"
    out = Path(cfg.run.out_dir) / name
    if args.what == "data":
        from distrib.bench_data import main_bench_data

        return main_bench_data(args, out)
    if args.what == "overhead":
        from distrib.bench_overhead import main_bench_overhead

        return main_bench_overhead(args, out)
    with tempfile.TemporaryDirectory() as scratch:
        times = bench_launch(args.nproc, args.repeats, Path(scratch))
    rows = summarise(times, "torchrun_minimal")
    ratio = float(rows[-1]["ratio_vs_torchrun_minimal"])  # type: ignore[arg-type]
    meta = {
        "what": "launch",
        "nproc": args.nproc,
        "repeats": args.repeats,
        "target_ratio": TARGET_LAUNCH_RATIO,
        "cpu_count": os.cpu_count(),
    }
    write_results(out, rows, times, meta)
    sys.stdout.write(markdown_table(rows) + "\n")
    verdict = "within" if ratio <= TARGET_LAUNCH_RATIO else "ABOVE"
    sys.stdout.write(
        f"launch.py / torchrun median ratio {ratio:.3f} ({verdict} target "
        f"{TARGET_LAUNCH_RATIO}); results in {out}\n"
    )
    return 0
