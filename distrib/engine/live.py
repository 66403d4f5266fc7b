"""``live_rank<N>.json``: what each rank is doing now, for ``launch.py top`` (distrib/top.py).

Why a file per rank, rewritten at most once a second: ``top`` must work from any machine that
sees the run directory (a login node, a laptop on a shared filesystem) without talking to the
job, and ranks on other nodes write their own. One small atomic write a second costs nothing
next to a step; the step, the last window's phases, memory and its trend, and the rank's
leak and straggler flags are all figures the loop already holds.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.context import DistContext
from distrib.engine.state import Hook, Run
from distrib.memory.detect import theil_sen
from distrib.memory.monitor import Monitor
from distrib.timing.clock import PHASES
from distrib.timing.watch import TimingHook

log = logging.getLogger(__name__)
EVERY_S = 1.0  # top refreshes once a second
TREND_ROWS = 200  # memory trend: the slope over the last rows (MB per 100 steps)
MEMORY_KEYS = ("alloc", "reserved", "host", "rss", "workers_rss", "gpu_process")


@dataclass(frozen=True)
class Plan:
    """What the run will do: for the ETA and the rank's images per second."""

    total_steps: int
    epochs: int
    images_per_step: int  # this rank's images per optimizer step (batch x accumulation)


class LiveHook(Hook):
    """Rewrites this rank's live file when a second has passed since the last write, and at the end."""

    def __init__(self, ctx: DistContext, run_dir: Path, plan: Plan, timing: TimingHook | None,
                 monitor: Monitor | None):  # fmt: skip
        self.ctx, self.plan, self.timing, self.monitor = ctx, plan, timing, monitor
        self.path = run_dir / f"live_rank{ctx.rank}.json"
        self.started = time.time()
        self.last = 0.0
        self.first_step: int | None = None
        self.node = platform.node()
        self.writable = True

    def after_step(self, run: Run) -> None:
        if self.first_step is None:
            self.first_step = run.prog.global_step - 1
        now = time.monotonic()
        if now - self.last >= EVERY_S:
            self.last = now
            self.write(run, "running")

    def write(self, run: Run, state: str) -> None:
        """``state``: running, finished, stopped or failed."""
        prog = run.prog
        done = prog.global_step - (self.first_step if self.first_step is not None else prog.global_step)
        elapsed = max(time.time() - self.started, 1e-9)
        rate = done / elapsed  # optimizer steps per second since this process started
        left = max(self.plan.total_steps - prog.global_step, 0)
        status = {
            "rank": self.ctx.rank, "world_size": self.ctx.world_size, "node": self.node,
            "device": str(self.ctx.device), "pid": os.getpid(), "time": time.time(), "state": state,
            "step": prog.global_step, "total_steps": self.plan.total_steps, "epoch": prog.epoch,
            "epochs": self.plan.epochs, "images_per_s": rate * self.plan.images_per_step,
            "eta_s": left / rate if rate > 0 and state == "running" else None,
            "phases_ms": self._phases(), **self._memory(), "straggler": self._straggler(),
        }  # fmt: skip
        tmp = self.path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(status))
            tmp.replace(self.path)
        except OSError as e:  # a full or read-only disk: top loses its view, the run goes on
            if self.writable:
                log.warning("cannot write %s (%s): launch.py top will not follow this rank", self.path, e)
            self.writable = False

    def _phases(self) -> dict[str, float] | None:
        """Medians of the last window's rows (the clock keeps every row; these are its newest)."""
        if self.timing is None or not self.timing.clock.rows:
            return None
        rows = self.timing.clock.rows[-self.timing.settings.window :]
        return {k: 1000 * statistics.median(r[k] for r in rows) for k in ("wall", *PHASES)}

    def _memory(self) -> dict[str, Any]:
        if self.monitor is None or not self.monitor.rows["step"]:
            return {"memory_mb": None, "trend_mb_per_100_steps": None, "leak": None}
        rows = self.monitor.rows
        latest = {k: mb(next((v for v in reversed(rows[k]) if v is not None), None)) for k in MEMORY_KEYS}
        found = self.monitor.finding
        leak = found.line(self.ctx.rank, str(self.ctx.device)) if found and found.verdict.leak else None
        return {"memory_mb": latest, "trend_mb_per_100_steps": trend(self.monitor), "leak": leak}

    def _straggler(self) -> str | None:
        """This rank's open straggler episode (every rank judges the same gathered numbers)."""
        if self.timing is None:
            return None
        episode = self.timing.judge.open.get(self.ctx.rank)
        return episode.message if episode is not None else None


def trend(monitor: Monitor) -> float | None:
    """MB per 100 steps of the series the leak detector judges (``Monitor.series``: torch's allocator
    on CUDA, glibc's heap on the CPU, else RSS), by the detector's own slope (Theil-Sen) over the
    last rows."""
    steps, values = monitor.rows["step"][-TREND_ROWS:], monitor.series()["alloc"][-TREND_ROWS:]
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
    if len(pairs) < 3:
        return None
    return 100 * theil_sen([s for s, _ in pairs], [v for _, v in pairs]) / 2**20


def mb(value: float | None) -> float | None:
    return None if value is None else value / 2**20
