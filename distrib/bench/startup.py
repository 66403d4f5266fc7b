"""``launch.py bench launch``: start-up time of launch.py against plain torchrun.

Wall time from starting ``python launch.py check --nproc-per-node N`` until every rank
has passed its first barrier and exited, against ``torchrun --standalone
--nproc_per_node N`` running a minimal script that does the same (bench/minimal.py).
Runs alternate A/B/B/A so drift (page cache, thermal, a neighbour) hits both sides;
medians are reported because these machines are noisy.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

from distrib.bench.toolkit import (
    REPO,
    markdown_table,
    run_checked,
    run_rounds,
    summarise,
    torchrun_cmd,
    write_results,
)
from distrib.errors import LaunchError

TARGET_RATIO = 1.10


def time_both(nproc: int, repeats: int, scratch: Path, warmup: int = 1) -> dict[str, list[float]]:
    """Alternating timed runs of both start-up paths (``warmup`` untimed runs of each first)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # both sides on gloo/CPU: this measures start-up, not GPUs
    minimal = str(Path(__file__).with_name("minimal.py"))
    cmds = {
        "torchrun_minimal": [*torchrun_cmd(), "--standalone", "--nproc_per_node", str(nproc), minimal],
        "launch_py": [sys.executable, str(REPO / "launch.py"), "check", "--nproc-per-node", str(nproc),
                      "--set", f"run.out_dir={scratch}"],
    }  # fmt: skip
    variants = {name: functools.partial(run_checked, cmd, env) for name, cmd in cmds.items()}
    return run_rounds(variants, repeats, warmup)


def main(out: Path, nproc: int, repeats: int, warmup: int = 1) -> int:
    """Run, print the table and the verdict, write the run directory."""
    if repeats < 1 or nproc < 1 or warmup < 0:
        raise LaunchError(
            f"--repeats and --nproc must be at least 1 and --warmup at least 0, got {repeats}, {nproc} "
            f"and {warmup}"
        )
    with tempfile.TemporaryDirectory() as scratch:
        times = time_both(nproc, repeats, Path(scratch), warmup)
    rows = summarise(times, "torchrun_minimal")
    ratio = statistics.median(times["launch_py"]) / statistics.median(times["torchrun_minimal"])
    meta = {"what": "launch", "nproc": nproc, "repeats": repeats, "warmup_runs": warmup,
            "target_ratio": TARGET_RATIO, "cpu_count": os.cpu_count()}  # fmt: skip
    write_results(out, rows, times, meta)
    verdict = "within" if ratio <= TARGET_RATIO else "ABOVE"
    sys.stdout.write(
        markdown_table(rows) + f"\nlaunch.py / torchrun median ratio {ratio:.3f} ({verdict} target "
        f"{TARGET_RATIO}); results in {out}\n"
    )
    return 0
