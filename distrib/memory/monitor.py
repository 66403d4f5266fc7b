"""The per-rank memory monitor: readings at step boundaries, a background sampler, the verdict.

Used by the engine (through a loop hook) and around a user's own script (through
torch's global optimizer-step hook, distrib/memory/userscript.py); it never needs a process
group of its own. What it adds to a step is a few cheap readings (torch's allocator
counters, glibc's mallinfo2, /proc RSS); everything that costs more (NVML, the children's
RSS, USS) happens in a background thread, and the tensor census only when a leak is
already suspected.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distrib.config import MemorySection
from distrib.errors import LeakError
from distrib.memory import census as cs
from distrib.memory.detect import ADVICE, Thresholds, Verdict, classify, steps_to_oom
from distrib.memory.probe import Fast, Probe, children_rss_fast

log = logging.getLogger(__name__)
COLUMNS = ("step", "t", "alloc", "reserved", "peak", "host", "heap", "rss", "uss", "workers_rss",
           "gpu_process", "gpu_device")  # fmt: skip
WINDOW = 2000  # steps judged: the recent ones (a check then costs ~2 ms however long the run)
WORKERS_EVERY_S = 0.01  # DataLoader workers' RSS is read at a step boundary at most this often (~50 us)
Agree = Callable[[bool], bool]  # True when any rank says True (the same answer on every rank)
NO_GROUP = (
    "no group of live tensors or arrays grew: most often one autograd graph growing across steps "
    "(`total += loss` without .item()), or memory of a C extension"
)


@dataclass(frozen=True)
class Where:
    """Which rank this monitor watches and where it writes."""

    rank: int
    world: int
    device: str  # "cpu" or "cuda:<i>"
    cuda_index: int | None
    run_dir: Path


FR_ENTRY_BYTES = 1024  # host memory per flight-recorder record, measured on gloo (~0.85 KiB)
FR_DEFAULT_ENTRIES = 2000


def recorder_allowance(world: int, environ: dict[str, str]) -> float:
    """Host bytes c10d's flight recorder may add while it fills its ring buffer (0 alone).

    Every collective of a process group is recorded in a ring of TORCH_FR_BUFFER_SIZE
    entries (default 2000): the host heap grows by about 2 MiB over the first 2000
    collectives, then stays flat. That is not a leak, and it looks like one at the start.
    """
    if world <= 1:
        return 0.0
    raw = environ.get("TORCH_FR_BUFFER_SIZE") or environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE")
    try:
        entries = int(raw) if raw else FR_DEFAULT_ENTRIES
    except ValueError:
        entries = FR_DEFAULT_ENTRIES
    return float(max(entries, 0) * FR_ENTRY_BYTES)


def thresholds(m: MemorySection) -> Thresholds:
    return Thresholds(m.warmup_steps, m.min_steps, m.min_rate_kb * 1024, m.min_growth_mb * 2**20)


@dataclass
class Finding:
    """A rank's final word: the verdict, the tensor groups that grew, steps left."""

    verdict: Verdict
    groups: list[str] = field(default_factory=list)
    steps_to_oom: int | None = None
    at_step: int = 0

    def line(self, rank: int, device: str) -> str:
        v = self.verdict
        if not v.judged:
            return f"rank {rank} ({device}): {v.text}: a run this short cannot show a leak"
        if not v.leak:
            return f"rank {rank} ({device}): no leak over {v.steps} judged step(s)" + "".join(
                f"; {name} not judged: too few samples ({n})" for name, n in v.unjudged
            )
        oom = (
            f", out of memory in ~{self.steps_to_oom:,} steps at this rate"
            if self.steps_to_oom is not None
            else ""
        )
        advice = ADVICE.get(v.cause, "")
        return (
            f"memory is leaking on rank {rank} ({device}) at {_size(v.rate)}/step ({v.series}, "
            f"+{_size(v.growth)} over {v.steps} steps){oom}; it looks like {v.text}"
            + "".join(f"\n    {g}" for g in self.groups)
            + (f"\n    fix: {advice}" if advice else "")
        )


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class Sampler(threading.Thread):
    """Slow readings every ``interval`` seconds, and peaks of the fast ones between steps."""

    def __init__(self, probe: Probe, interval: float):
        super().__init__(name="memory-sampler", daemon=True)
        self.probe, self.interval = probe, interval
        self.slow = probe.slow(with_uss=True)
        self.peak_rss = 0
        self.times: list[tuple[float, Fast, int | None]] = []  # (t, fast, workers): scripts without a step
        self.record_times = True  # until the first step: then the step rows are the series
        self._stop_event = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._stop_event.wait(self.interval):
            n += 1
            self.slow = self.probe.slow(with_uss=n % 10 == 0)
            fast = self.probe.fast()
            self.peak_rss = max(self.peak_rss, fast.rss)
            if self.record_times:
                self.times.append((time.monotonic(), fast, children_rss_fast()))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)


class Monitor:
    """One rank's monitor; ``on_step`` at every optimizer step, ``finish`` once at the end."""

    def __init__(self, where: Where, settings: MemorySection, agree: Agree):
        self.where, self.settings, self.agree = where, settings, agree
        self.th = thresholds(settings)
        host = "host" if where.cuda_index is not None else "alloc"
        self.allowance = {host: recorder_allowance(where.world, dict(os.environ))}
        self.rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        self.t0 = time.monotonic()
        self.probe: Probe | None = None
        self.sampler: Sampler | None = None
        self.suspect: tuple[int, Any] | None = None  # (step, census) once a leak is suspected
        self.finding: Finding | None = None
        self.announced = False
        self.snapshotting = False
        self.unit = "step"  # what a row stands for: an optimizer step, or a background sample
        self.workers_at = 0.0  # when the workers' RSS was last read at a step boundary
        self.exit_info: dict[str, Any] | None = None  # how a user's script ended (run, memcheck)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Monitor:
        self.probe = Probe.open(self.where.device, self.where.cuda_index)
        if self.probe.limits and self.where.rank == 0:
            log.info("memory monitor: not monitored here: %s", "; ".join(self.probe.limits))
        self.sampler = Sampler(self.probe, self.settings.interval_s)
        self.sampler.start()
        return self

    def on_step(self, step: int) -> None:
        """Record one row; every ``check_every`` steps judge, and act on a final verdict."""
        assert self.probe is not None and self.sampler is not None
        if self.sampler.record_times:
            self.sampler.record_times, self.sampler.times = False, []
        fast, slow, r = self.probe.fast(), self.sampler.slow, self.rows
        for c, v in (
            ("step", step), ("t", round(time.monotonic() - self.t0, 4)), ("alloc", fast.alloc),
            ("reserved", fast.reserved), ("peak", fast.peak), ("host", fast.host), ("heap", fast.heap),
            ("rss", fast.rss), ("uss", slow.uss), ("workers_rss", self._workers()),
            ("gpu_process", slow.gpu_process), ("gpu_device", slow.gpu_device),
        ):  # fmt: skip
            r[c].append(v)
        if step % self.settings.check_every == 0:
            self._check(step)

    def _workers(self) -> int | None:
        """The workers' RSS, read here when the last reading is WORKERS_EVERY_S old (None between):
        the detector judges the points actually measured, not one 1 Hz value repeated per step."""
        now = time.monotonic()
        if now - self.workers_at < WORKERS_EVERY_S:
            return None
        self.workers_at = now
        fresh = children_rss_fast()
        return fresh if fresh is not None else (self.sampler.slow.workers_rss if self.sampler else None)

    def finish(self, exit_info: dict[str, Any] | None = None) -> Finding:
        """Stop sampling, judge the whole run, write memory_rank<N>.csv and .json (with ``exit_info``:
        how this rank's script ended, for rank 0's summary)."""
        self.exit_info = exit_info
        if self.sampler is not None:
            self.sampler.stop()
            if not self.rows["step"]:
                self._rows_from_samples()
        steps = self.rows["step"][-1] if self.rows["step"] else 0
        if self.finding is None:
            self._judge_final(steps)
        assert self.finding is not None
        self._write()
        return self.finding

    def _rows_from_samples(self) -> None:
        """No optimizer step was seen (a script without one): judge the background samples instead."""
        assert self.sampler is not None
        self.unit = f"sample ({self.settings.interval_s:g} s)"
        slow = self.sampler.slow  # the last slow reading stands for NVML and USS in every sample
        for i, (t, fast, workers) in enumerate(self.sampler.times, start=1):
            row = {
                "step": i,
                "t": round(t - self.t0, 4),
                **asdict(fast),
                **asdict(slow),
                "workers_rss": workers,
            }
            for c in COLUMNS:
                self.rows[c].append(row.get(c))
        if self.rows["step"]:
            log.info(
                "memory: no optimizer step was seen; judging %d background samples", len(self.rows["step"])
            )

    # ------------------------------------------------------------------ judging

    def series(self) -> dict[str, list[Any]]:
        """What classify() reads (the last WINDOW steps): torch's allocator on CUDA, glibc's on the CPU."""
        r = {c: v[-WINDOW:] for c, v in self.rows.items()}
        if self.where.cuda_index is not None:
            names = ("alloc", "reserved", "gpu_process", "gpu_device", "workers_rss")
            return {**{n: r[n] for n in names}, "host": r["host"]}
        if any(v is not None for v in r["host"]):
            # RSS is recorded, not judged: it climbs on healthy runs (pages touched for the first
            # time, memory glibc keeps) while the allocator's counters stay flat
            return {"alloc": r["host"], "reserved": r["heap"], "workers_rss": r["workers_rss"]}
        return {"alloc": r["rss"], "workers_rss": r["workers_rss"]}  # no mallinfo2: RSS is all there is

    def _check(self, step: int) -> None:
        if self.finding is None:
            if self.suspect is None:
                verdict = classify(self.rows["step"][-WINDOW:], self.series(), self.th, self.allowance)
                if verdict.leak:
                    self._suspect(step)
            elif step >= self.suspect[0] + self.settings.census_gap:
                self._judge_final(step)
        if self.settings.on_leak == "fail":
            mine = self.finding is not None and self.finding.verdict.leak
            if self.agree(mine):
                raise LeakError(self._stop_message())
        elif self.finding is not None and self.finding.verdict.leak and not self.announced:
            self.announced = True
            log.warning("%s", self.finding.line(self.where.rank, self.where.device))

    def _suspect(self, step: int) -> None:
        self.suspect = (step, cs.census())
        if self.settings.on_leak == "snapshot":
            from distrib.memory.snapshot import start_recording

            self.snapshotting = start_recording(self.where.device)

    def _judge_final(self, step: int) -> None:
        verdict = classify(self.rows["step"][-WINDOW:], self.series(), self.th, self.allowance)
        groups: list[str] = []
        if self.suspect is not None and verdict.leak:
            gap = step - self.suspect[0]
            growth = cs.grown(self.suspect[1], cs.census(), gap)
            verdict = refine(verdict, growth, self.where.cuda_index is not None)
            groups = census_lines(verdict, growth, gap)
            if self.snapshotting:
                from distrib.memory.snapshot import dump_and_explain

                groups += dump_and_explain(
                    self.where.run_dir / f"memory_snapshot_rank{self.where.rank}.pickle"
                )
        headroom = self._headroom()
        self.finding = Finding(
            verdict, groups, steps_to_oom(verdict.rate, headroom) if verdict.leak else None, step
        )

    def _headroom(self) -> int | None:
        if self.probe is None or self.sampler is None:
            return None
        try:
            return self.probe.headroom(self.probe.fast(), self.sampler.slow)
        except Exception:  # a driver call failed at the end: the estimate goes without
            return None

    def _stop_message(self) -> str:
        if self.finding is not None and self.finding.verdict.leak:
            return "memory.on_leak = fail: " + self.finding.line(self.where.rank, self.where.device)
        return (
            f"memory.on_leak = fail: another rank found a memory leak; rank {self.where.rank} stops with it"
        )

    # ------------------------------------------------------------------ output

    def _write(self) -> None:
        w, f = self.where, self.finding
        assert f is not None
        w.run_dir.mkdir(parents=True, exist_ok=True)
        with (w.run_dir / f"memory_rank{w.rank}.csv").open("w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(COLUMNS)
            wr.writerows(zip(*(self.rows[c] for c in COLUMNS), strict=True))
        (w.run_dir / f"memory_rank{w.rank}.json").write_text(json.dumps(self.report(), indent=2))

    def report(self) -> dict[str, Any]:
        """This rank's figures for summary.json and the verdict table."""
        f = self.finding
        assert f is not None
        peaks = {c: max((v for v in self.rows[c] if v is not None), default=None) for c in COLUMNS[2:]}
        if self.sampler is not None:
            peaks["rss"] = max(peaks["rss"] or 0, self.sampler.peak_rss)
        return {
            "rank": self.where.rank,
            "device": self.where.device,
            "steps": self.rows["step"][-1] if self.rows["step"] else 0,
            "peak": peaks,
            "gpu_total": self.sampler.slow.gpu_total if self.sampler else None,
            "gpu_uuid": self.probe.gpu_uuid if self.probe else "",
            "not_monitored": self.probe.limits if self.probe else [],
            "leak": f.verdict.leak,
            "judged": f.verdict.judged,
            "verdict": asdict(f.verdict) | {"text": f.verdict.text, "short": f.verdict.short},
            "groups": f.groups,
            "steps_to_oom": f.steps_to_oom,
            "message": f.line(self.where.rank, self.where.device).replace("/step", f"/{self.unit}"),
            "unit": self.unit,
            "exit": self.exit_info,
        }


def refine(verdict: Verdict, growth: list[cs.Growth], cuda: bool) -> Verdict:
    """On the CPU glibc's counters hold tensors and everything else: the census tells which. And
    on the CPU a growing reserve is glibc's heap pinned by small kept allocations, not CUDA's
    allocator (whose advice would not apply)."""
    if cuda:
        return verdict
    if verdict.cause == "fragmentation":
        return replace(verdict, cause="heap_pinned")
    if verdict.cause != "tensors" or any(g.group[0] == "tensor" for g in growth):
        return verdict
    if any(g.group[0] == "ndarray" for g in growth):
        return replace(verdict, cause="outside_torch")
    return verdict  # no group grew: a growing autograd graph (total += loss) or a C extension


def census_lines(verdict: Verdict, growth: list[cs.Growth], gap: int) -> list[str]:
    """What the census says under a verdict: the groups that grew, else why none did. The census
    counts this process's objects: a verdict on the workers' memory gets no hint about graphs."""
    if verdict.cause == "workers":
        return [g.describe(gap) for g in growth]
    return [g.describe(gap) for g in growth] or [NO_GROUP]
