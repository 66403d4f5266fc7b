"""``launch.py top [RUN_DIR]``: a live terminal view of a training job, read from its run directory.

Why files and not a socket: the view must work from any machine that sees the run directory
(a login node, another node of the job, a laptop on the shared filesystem), while the job runs
or after it ended, without a port or a handshake. Every rank rewrites ``live_rank<N>.json``
at most once a second (distrib/engine/live.py); this module only reads them (no torch), draws
one table and redraws it every second. ``q`` or Ctrl-C quits and restores the terminal; without
a terminal (a pipe, a log, ``--once``) it prints one snapshot and exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from distrib.errors import LaunchError

STALE_S = 15.0  # a running job's files older than this: say the job may be gone
PHASE_COLUMNS = (("wall", "wall"), ("data", "data"), ("compute", "comp"), ("comm", "comm"),
                 ("optimizer", "opt"), ("rest", "rest"))  # fmt: skip


def newest_run(out_dir: Path) -> Path:
    """The run under ``out_dir`` whose rank 0 wrote its live file last."""
    found = (
        sorted(out_dir.glob("*/live_rank0.json"), key=lambda p: p.stat().st_mtime) if out_dir.is_dir() else []
    )
    if not found:
        raise LaunchError(
            f"no training run with live_rank0.json under {out_dir}/ (train writes it once its first step "
            "ends); name the run directory: launch.py top RUN_DIR, or set run.out_dir"
        )
    return found[-1].parent


def read_ranks(folder: Path) -> list[dict[str, Any]]:
    """Every rank's live status, for the world size rank 0 reports (files of an earlier, larger
    round of an elastic job are left out)."""
    ranks = []
    for path in folder.glob("live_rank*.json"):
        with contextlib.suppress(OSError, ValueError):  # replaced between glob and read: next refresh
            ranks.append(json.loads(path.read_text()))
    world = next((r["world_size"] for r in ranks if r.get("rank") == 0), None)
    return sorted((r for r in ranks if world is None or r["rank"] < world), key=lambda r: r["rank"])


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def job_line(ranks: list[dict[str, Any]], now: float) -> str:
    """State, slowest rank's step of the total, epoch, the job's images/s, ETA, age of the newest file."""
    lead = ranks[0]
    states = {r["state"] for r in ranks}
    state = "failed" if "failed" in states else "stopped" if "stopped" in states else min(states)
    age = now - max(r["time"] for r in ranks)
    if state == "running" and age > STALE_S:
        state = f"no update for {age:.0f} s (the job may be gone)"
    step = min(r["step"] for r in ranks)
    rate = sum(r["images_per_s"] for r in ranks)
    epoch = min(lead["epoch"] + 1, lead["epochs"])
    return (
        f"{state} | step {step}/{lead['total_steps']} | epoch {epoch}/{lead['epochs']} | "
        f"{rate:.0f} img/s | ETA {clock(lead['eta_s'] if state == 'running' else None)} | "
        f"updated {age:.1f} s ago"
    )


def memory_cell(r: dict[str, Any]) -> tuple[str, str]:
    """(MB, trend per 100 steps): the GPU process's memory on CUDA, the process RSS on the CPU."""
    mem = r.get("memory_mb") or {}
    value = mem.get("gpu_process") if r["device"].startswith("cuda") else mem.get("rss")
    trend = r.get("trend_mb_per_100_steps")
    return (f"{value:.0f}" if value is not None else "-", f"{trend:+.1f}" if trend is not None else "-")


def rank_rows(ranks: list[dict[str, Any]]) -> list[str]:
    head = f"{'rank':>4} {'node':<12} {'device':<7} {'step':>6} {'img/s':>7}"
    head += "".join(f" {name:>6}" for _, name in PHASE_COLUMNS) + f" {'mem MB':>7} {'/100st':>7}  flags"
    lines = [head + "   (phases: ms per step, median of the last window)"]
    for r in ranks:
        phases = r.get("phases_ms") or {}
        cells = "".join(f" {phases[k]:6.1f}" if k in phases else f" {'-':>6}" for k, _ in PHASE_COLUMNS)
        flags = " ".join(f for f, on in (("STRAGGLER", r.get("straggler")), ("LEAK", r.get("leak"))) if on)
        mem, trend = memory_cell(r)
        lines.append(
            f"{r['rank']:>4} {r['node'][:12]:<12} {r['device'][:7]:<7} {r['step']:>6} "
            f"{r['images_per_s']:7.1f}"
            f"{cells} {mem:>7} {trend:>7}  {flags}"
        )
    return lines


def render(folder: Path, now: float) -> str:
    """The whole view as text: the job's line, a row per rank, then each flag's sentence."""
    ranks = read_ranks(folder)
    title = f"torchlaunch top: {folder}"
    if not ranks:
        return f"{title}\nwaiting for the job's first step (no live_rank*.json yet)\n"
    notes = [f"rank {r['rank']}: {r[k]}" for r in ranks for k in ("straggler", "leak") if r.get(k)]
    return (
        "\n".join([title, job_line(ranks, now), "", *rank_rows(ranks), *([""] + notes if notes else [])])
        + "\n"
    )


@contextlib.contextmanager
def raw_keys(fd: int) -> Iterator[None]:
    """Single keys without Enter or echo, the cursor hidden; the terminal restored however we leave."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    sys.stdout.write("\x1b[?25l")
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write("\x1b[?25h\n")
        sys.stdout.flush()


def live(folder: Path, out: TextIO, interval: float = 1.0) -> None:
    """Redraw every ``interval`` seconds until ``q`` (or Ctrl-C)."""
    fd = sys.stdin.fileno()
    with raw_keys(fd), contextlib.suppress(KeyboardInterrupt):
        while True:
            out.write("\x1b[H\x1b[2J" + render(folder, time.time()) + "\n(q quits)")
            out.flush()
            ready, _, _ = select.select([fd], [], [], interval)
            if ready and os.read(fd, 1) in (b"q", b"Q", b"\x03"):
                return


def main_top(run_dir: str | None, out_dir: str, once: bool) -> int:
    folder = Path(run_dir) if run_dir else newest_run(Path(out_dir))
    if not folder.is_dir():
        what = "is a file, not a run directory" if folder.exists() else "does not exist"
        raise LaunchError(f"{folder} {what} (launch.py top RUN_DIR: a folder under run.out_dir)")
    if once or not (sys.stdout.isatty() and sys.stdin.isatty()):
        if not read_ranks(folder):
            raise LaunchError(
                f"{folder} holds no live_rank*.json: train writes them once its first step ends "
                "(other commands do not)"
            )
        sys.stdout.write(render(folder, time.time()))
        return 0
    live(folder, sys.stdout)
    return 0
