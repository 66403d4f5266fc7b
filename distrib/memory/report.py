"""Every rank's memory in one place: the summary (peaks, skew, headroom), memory.png, the verdict table.

Built from the files each rank writes (memory_rank<N>.json/.csv), so it needs no
collective: after a user's script has torn its process group down, rank 0 (or the
launcher) can still put the ranks side by side.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def rank_reports(
    run_dir: Path, world: int, wait_s: float = 30.0, give_up: Callable[[], bool] | None = None
) -> list[dict[str, Any]]:
    """The ranks' memory_rank<N>.json, waiting up to ``wait_s`` for ranks that finish later
    (and saying so, after a second, naming the ranks it waits for), or until ``give_up()``."""
    start = time.monotonic()
    paths = [run_dir / f"memory_rank{r}.json" for r in range(world)]
    said = False
    deadline = start + wait_s
    while (missing := [r for r, p in enumerate(paths) if not p.exists()]) and time.monotonic() < deadline:
        if give_up is not None and give_up():
            break
        if not said and time.monotonic() > start + 1.0:
            log.info(
                "memory: waiting up to %.0f s more for the report of rank(s) %s (still running their script)",
                deadline - time.monotonic(),
                ",".join(map(str, missing)),
            )
            said = True
        time.sleep(0.1)
    reports = []
    for p in paths:
        try:
            reports.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            log.warning(
                "memory: no report from %s (that rank ended before writing it)", p.stem.replace("memory_", "")
            )
    return reports


def leak_found(run_dir: Path) -> bool | None:
    """Whether the memory detector found a leak on any rank of ``run_dir`` (its ranks'
    memory_rank<N>.json); None when no rank wrote a readable report there."""
    found = None
    for path in run_dir.glob("memory_rank*.json"):
        try:
            found = bool(found) or bool(json.loads(path.read_text()).get("leak"))
        except (OSError, ValueError):
            continue
    return found


def summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak per rank (GPU: torch reserved and NVML; host: RSS), the skew across ranks, the headroom."""
    per_rank = {}
    for r in reports:
        p = r["peak"]
        per_rank[str(r["rank"])] = {
            "device": r["device"],
            "peak_allocated": p.get("alloc") if r["device"] != "cpu" else p.get("host"),
            "peak_reserved": p.get("reserved") if r["device"] != "cpu" else p.get("heap"),
            "peak_gpu_process": p.get("gpu_process"),
            "peak_rss": p.get("rss"),
            "headroom": r["gpu_total"] - p["gpu_device"]
            if r.get("gpu_total") and p.get("gpu_device")
            else None,
            "leak": r["leak"],
            "steps_to_oom": r["steps_to_oom"],
        }
    peaks = [v["peak_reserved"] or v["peak_rss"] or 0 for v in per_rank.values()]
    return {
        "per_rank": per_rank,
        "skew": max(peaks) / min(peaks) if peaks and min(peaks) > 0 else None,
        "leak_ranks": [r["rank"] for r in reports if r["leak"]],
        "not_monitored": reports[0]["not_monitored"] if reports else [],
    }


def verdict_table(reports: list[dict[str, Any]]) -> str:
    """One line per rank: leak or not, rate, cause, steps left; then the details of each leak."""
    lines = [
        "| rank | device | steps | leak | rate/step | cause | out of memory in |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        v = r["verdict"]
        rate = f"{v['rate'] / 1024:.1f} KiB" if r["leak"] else "-"
        oom = f"~{r['steps_to_oom']:,} steps" if r["steps_to_oom"] is not None else "-"
        cause = v["text"] if r["leak"] else "-"
        cells = [
            r["rank"],
            r["device"],
            r["steps"],
            v.get("short", "YES" if r["leak"] else "no"),
            rate,
            cause,
            oom,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    details = [r["message"] for r in reports if r["leak"]]
    return "\n".join(lines + ([""] + details if details else []))


def plot(run_dir: Path, reports: list[dict[str, Any]]) -> Path | None:
    """memory.png: allocated (solid) and reserved (dashed) per rank, and host RSS, against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("memory.png not drawn: matplotlib is not installed")
        return None
    fig, (gpu, host) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in reports:
        rows = list(csv.DictReader((run_dir / f"memory_rank{r['rank']}.csv").open()))
        steps = [int(x["step"]) for x in rows]
        cuda = r["device"] != "cpu"
        a, b = ("alloc", "reserved") if cuda else ("host", "heap")
        for col, style in ((a, "-"), (b, "--")):
            ys = [int(x[col]) / 2**20 if x[col] not in ("", "None") else float("nan") for x in rows]
            gpu.plot(steps, ys, style, label=f"rank {r['rank']} {col}")
        host.plot(steps, [int(x["rss"]) / 2**20 for x in rows], label=f"rank {r['rank']} RSS")
    gpu.set_ylabel("MiB (torch on CUDA; glibc on CPU)")
    host.set_ylabel("host RSS, MiB")
    host.set_xlabel("optimizer step")
    for ax in (gpu, host):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "memory.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def combine(
    run_dir: Path, world: int, wait_s: float = 30.0, give_up: Callable[[], bool] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """summary and per-rank reports of the run; memory.png drawn beside them."""
    reports = rank_reports(run_dir, world, wait_s, give_up)
    if reports:
        plot(run_dir, reports)
    return summary(reports), reports
