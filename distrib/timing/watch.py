"""The training loop's timing hook: per-rank rows, the window comparison, straggler verdicts.

Every ``timing.window`` optimizer steps each rank appends its rows to ``timing_rank<N>.csv``
(one write per window, not per step) and the ranks gather their window medians (one
all_gather_object per window: the breakdown's only collective). At the end, ``summary.json``
gets each rank's median per phase and the straggler episodes.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from distrib.config import TimingSection
from distrib.context import DistContext
from distrib.engine.metrics import trim_steps
from distrib.engine.state import Hook, Run
from distrib.errors import EchoedError, LaunchError
from distrib.process_group import gather_objects
from distrib.timing.clock import COLUMNS, PHASES, StepClock, csv_row
from distrib.timing.straggler import Judge, WindowStats, straggler_check

log = logging.getLogger(__name__)


class StragglerError(LaunchError):
    """timing.on_straggler = fail: every rank stops at the same window."""


class EchoedStragglerError(StragglerError, EchoedError):
    """The same verdict on the other ranks: logged once, by rank 0."""


class TimingHook(Hook):
    """Writes the clock's rows and judges the ranks once a window."""

    def __init__(
        self, ctx: DistContext, settings: TimingSection, clock: StepClock, run_dir: Path | None, step: int = 0
    ):
        """``step``: the optimizer step the run resumes after; rows logged beyond it before a stop are
        dropped (they are timed again), so each step has one row whatever the world size now."""
        self.ctx, self.settings, self.clock = ctx, settings, clock
        self.judge = Judge(settings.ratio, settings.min_share, settings.patience)
        self.path = run_dir / f"timing_rank{ctx.rank}.csv" if run_dir is not None else None
        if self.path is not None:
            trim_steps(self.path, step)
        self.windows = 0  # windows judged (with more than one rank)
        self.written = 0  # rows already in the file
        self.judged = 0  # rows already compared
        self.node = platform.node()

    def start_epoch(self, run: Run) -> None:
        self.clock.restart()  # validation and the epoch's end are not a step's time

    def after_step(self, run: Run) -> None:
        if run.prog.global_step % self.settings.window:
            return
        self.write()
        rows = self.clock.rows[self.judged :]
        self.judged = len(self.clock.rows)
        if not rows:
            return
        mine = WindowStats.of(self.ctx.rank, self.node, str(self.ctx.device), rows, gpu_reading(self.ctx))
        stats = gather_objects(self.ctx, mine)
        self.windows += len(stats) > 1
        if run.board is not None:
            run.board.scalars(run.prog.global_step, board_figures(mine))
        for episode in self.judge.window(stats, run.prog.global_step):
            if run.board is not None and self.ctx.is_main:
                run.board.scalars(run.prog.global_step, {"events/straggler_rank": episode.rank})
                run.board.event("events/straggler", run.prog.global_step, episode.message)
            if self.settings.on_straggler == "fail":  # every rank judged alike: rank 0 says it once
                error = StragglerError if self.ctx.is_main else EchoedStragglerError
                raise error(f"{episode.message} (timing.on_straggler = fail)")
            if self.ctx.is_main:
                log.warning("%s", episode.message)

    def write(self) -> None:
        """Append the rows not yet in this rank's file."""
        if self.path is None or self.written >= len(self.clock.rows):
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as fh:
            out = csv.writer(fh)
            if new:
                out.writerow(COLUMNS)
            for row in self.clock.rows[self.written :]:
                out.writerow(csv_row(row))
        self.written = len(self.clock.rows)

    def summary(self) -> dict[str, Any]:
        """Every rank's medians per phase (seconds) and the straggler episodes (all ranks call this)."""
        self.clock.flush()
        self.write()
        rows = self.clock.rows
        mine = (
            {k: statistics.median(r[k] for r in rows) for k in ("wall", *PHASES, "cpu", "queue")}
            if rows
            else {}
        )
        every = gather_objects(self.ctx, {"rank": self.ctx.rank, "steps": len(rows), **mine})
        return {
            "median_s_per_rank": every,
            "stragglers": [e.as_dict() for e in self.judge.episodes],
            "straggler_check": self.verdict(),
            "window": self.settings.window,
        }

    def verdict(self) -> str:
        """What "no straggler" rests on: windows judged, or why none could be."""
        s = self.settings
        return straggler_check(
            self.ctx.world_size, self.windows, s.window, s.patience, len(self.judge.episodes)
        )


def board_figures(mine: WindowStats) -> dict[str, float | None]:
    """A window's medians under TensorBoard's ``time/`` tags: phases in ms, CPU and run-queue shares."""
    m = mine.medians
    return {
        **{f"time/{k}_ms": 1000 * m[k] for k in ("wall", *PHASES)},
        "time/cpu_per_s": m["cpu"],
        "time/queue_share": m["queue"],
    }


def gpu_reading(ctx: DistContext) -> dict[str, Any]:
    """Clocks, throttle reasons, utilisation and other processes of this rank's GPU ({} without NVML)."""
    if not ctx.is_cuda:
        return {}
    try:
        import pynvml
        import torch

        from distrib.memory.probe import nvml_uuid

        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(ctx.device)
        handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(props.uuid))
        reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
        return {
            "throttle": throttle_names(pynvml, reasons),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "util_pct": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "other_processes": sum(
                1 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid != os.getpid()
            ),
        }
    except Exception:  # noqa: BLE001 - no driver, an old one, a fake: the verdict says there is no reading
        return {}


THROTTLE_NAMES = {
    "nvmlClocksThrottleReasonHwSlowdown": "hardware slowdown",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "thermal (hardware)",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "thermal (software)",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "power brake",
    "nvmlClocksThrottleReasonSwPowerCap": "power cap",
    "nvmlClocksThrottleReasonSyncBoost": "sync boost",
    "nvmlClocksThrottleReasonApplicationsClocksSetting": "application clocks setting",
}


def throttle_names(pynvml: Any, reasons: int) -> list[str]:
    return [text for name, text in THROTTLE_NAMES.items() if reasons & getattr(pynvml, name, 0)]
