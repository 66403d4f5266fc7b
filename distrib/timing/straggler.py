"""Which rank holds the others back, and the likely cause (pure: every rank judges the same numbers).

Once a window, every rank's phase medians are gathered on every rank (one all_gather_object);
:class:`Judge` compares each rank's compute and data wait with the *other* ranks' median. A rank
slow by ``timing.ratio`` (and by at least ``timing.min_share`` of a step, so that a 0.1 ms phase
tripling is not news) for ``timing.patience`` windows in a row is a straggler: named once per
episode (it ends at the first window it is not slow), with what it costs the others (their wait
in the gradient all-reduce as a share of their step) and the likely cause:

- a CPU rank whose training thread waited in Linux's run queue for a CPU for a good share of
  its compute (15%), so much more than the others that the wait alone makes it 15% slower
  ((1 - theirs) / (1 - its)) and explains at least half of its slowdown (in log terms): another
  process shares its cores (its compute and decoding alike; a slow data phase only when its
  compute is slowed by at least the square root of the data's slowdown, else as a second cause);
- data: its loader is starved (too few workers, a slow disk, slow decoding);
- compute on a GPU rank: what NVML says (clocks, throttle reasons, utilisation, other processes).

Because every rank holds the same gathered numbers and runs the same judge, a ``fail`` verdict
stops every rank at the same step without a collective of its own.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from distrib.timing.clock import PHASES

SHARED_QUEUE = 0.15  # a CPU rank waiting at least this share of its compute for a CPU ...
QUEUE_SLOWDOWN = 1.15  # ... and so much more than the others that the wait alone makes it 15% slower


@dataclass(frozen=True)
class WindowStats:
    """One rank's medians over a window of steps, and where it runs."""

    rank: int
    node: str
    device: str  # "cpu" or "cuda:N"
    steps: int
    medians: dict[str, float]  # wall, the phases, cpu (process CPU seconds per wall second)
    gpu: dict[str, Any] = field(default_factory=dict)  # NVML readings on CUDA ranks

    @staticmethod
    def of(
        rank: int, node: str, device: str, rows: list[dict[str, float]], gpu: dict[str, Any]
    ) -> WindowStats:
        keys = ("wall", *PHASES, "cpu", "queue")
        return WindowStats(
            rank, node, device, len(rows), {k: statistics.median(r[k] for r in rows) for k in keys}, gpu
        )


@dataclass
class Episode:
    """A rank named a straggler: from the window it was named to the last window it was slow."""

    rank: int
    phase: str
    first_step: int
    last_step: int
    ratio: float
    others_wait_share: float
    cause: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Judge:
    """Streaks of slow windows per rank; episodes named once."""

    ratio: float
    min_share: float
    patience: int
    streak: dict[int, int] = field(default_factory=dict)
    open: dict[int, Episode] = field(default_factory=dict)
    episodes: list[Episode] = field(default_factory=list)

    def window(self, stats: list[WindowStats], step: int) -> list[Episode]:
        """This window's stats of every rank, at optimizer step ``step``; the episodes it starts."""
        started = []
        for s in stats:
            slow = slow_phase(s, stats, self.ratio, self.min_share)
            if slow is None:
                self.streak[s.rank] = 0
                self.open.pop(s.rank, None)
                continue
            self.streak[s.rank] = self.streak.get(s.rank, 0) + 1
            if s.rank in self.open:
                self.open[s.rank].last_step = step
            elif self.streak[s.rank] >= self.patience:
                episode = describe(s, stats, slow, step, self.patience)
                self.open[s.rank] = episode
                self.episodes.append(episode)
                started.append(episode)
        return started


def straggler_check(ranks: int, windows: int, window: int, patience: int, episodes: int) -> str:
    """What "no straggler" rests on: the windows compared, or why none could be judged."""
    if ranks < 2:
        return "not judged: one rank"
    if windows < patience:
        return (
            f"not judged: {windows} window(s) of {window} steps compared, fewer than timing.patience "
            f"({patience})"
        )
    return f"{windows} window(s) of {window} steps compared; {episodes} episode(s)"


def others(stats: list[WindowStats], rank: int, key: str) -> float:
    return statistics.median(s.medians[key] for s in stats if s.rank != rank)


def slow_phase(
    s: WindowStats, stats: list[WindowStats], ratio: float, min_share: float
) -> tuple[str, float] | None:
    """("compute" or "data", mine / the others' median) when ``s`` is slow this window, else None."""
    if len(stats) < 2:
        return None
    worst = None
    for phase in ("compute", "data"):
        mine, theirs = s.medians[phase], others(stats, s.rank, phase)
        excess = mine - theirs
        if excess < min_share * max(s.medians["wall"], 1e-9) or mine < ratio * theirs:
            continue
        r = mine / max(theirs, 1e-9)
        if worst is None or r > worst[1]:
            worst = (phase, r)
    return worst


def describe(
    s: WindowStats, stats: list[WindowStats], slow: tuple[str, float], step: int, windows: int
) -> Episode:
    phase, ratio = slow
    waits = [o.medians["comm"] / max(o.medians["wall"], 1e-9) for o in stats if o.rank != s.rank]
    share = statistics.median(waits)
    cause = likely_cause(s, stats, phase, ratio)
    name = "forward/backward" if phase == "compute" else "data wait"
    ratio_text = f"{ratio:.2f}x" if ratio < 100 else "far above"
    message = (
        f"rank {s.rank} (node {s.node}, {s.device}) is a straggler: {name} {ratio_text} the others' median "
        f"for {windows} window(s); the others wait {100 * share:.0f}% of each step for it; {cause}"
    )
    return Episode(s.rank, phase, step, step, round(ratio, 3), round(share, 4), cause, message)


def likely_cause(s: WindowStats, stats: list[WindowStats], phase: str, ratio: float = 1.0) -> str:
    """The cause read from the rank's own numbers (and NVML's, on a GPU)."""
    if s.device.startswith("cuda"):
        return gpu_cause(s.gpu) if phase == "compute" else starved(s, stats)
    cpu, theirs = s.medians["cpu"], others(stats, s.rank, "cpu")
    queue, their_queue = s.medians["queue"], others(stats, s.rank, "queue")
    slowdown = (1 - min(their_queue, 0.99)) / max(1 - queue, 0.01)  # from waiting for a CPU alone
    # the wait for a CPU must explain at least half of the slowdown (in log terms): a rank 20x slower
    # in its data phase that also waited for a CPU is starved first. The wait is measured during
    # compute, and shared cores slow compute and decoding alike, so a slow data phase is blamed on
    # them only when compute is slowed as much, by half the data's slowdown in log terms (seen in CI:
    # a loader sleeping per item 8x slower, its compute 1.2x slower on a loaded host, tiny compute
    # phases preempted once "waiting 70-105%" of it for a CPU); with compute slowed less, the
    # starved loader is the news and the shared cores a second line
    compute_ratio = s.medians["compute"] / max(others(stats, s.rank, "compute"), 1e-9)
    shared = queue >= SHARED_QUEUE and slowdown >= max(QUEUE_SLOWDOWN, math.sqrt(ratio))
    cores = (
        f"it waited {100 * queue:.0f}% of its compute time for a CPU against the others' "
        f"{100 * their_queue:.0f}%, and got {cpu:.2f} s of CPU per second of compute "
        "(its cores are shared with another process)"
    )
    if shared and (phase == "compute" or compute_ratio >= max(QUEUE_SLOWDOWN, math.sqrt(ratio))):
        return cores
    if phase == "data":
        also = shared and compute_ratio >= QUEUE_SLOWDOWN
        return starved(s, stats) + (f"; also, {cores}" if also else "")
    return f"it got {cpu:.2f} s of CPU per second of compute, as others ({theirs:.2f}): it computes slower"


def starved(s: WindowStats, stats: list[WindowStats]) -> str:
    return (
        f"its loader is starved: it waits {1000 * s.medians['data']:.1f} ms per step for data against "
        f"{1000 * others(stats, s.rank, 'data'):.1f} ms (data.num_workers, the disk, decoding)"
    )


def gpu_cause(gpu: dict[str, Any]) -> str:
    """NVML's view of a slow GPU: throttling, clocks, utilisation, other processes."""
    if not gpu:
        return "no NVML reading of its GPU (install nvidia-ml-py to see clocks and throttle reasons)"
    parts = []
    if gpu.get("throttle"):
        parts.append("throttled: " + ", ".join(gpu["throttle"]))
    if gpu.get("sm_clock_mhz") and gpu.get("sm_clock_max_mhz"):
        parts.append(f"SM clock {gpu['sm_clock_mhz']} of {gpu['sm_clock_max_mhz']} MHz")
    if gpu.get("util_pct") is not None:
        parts.append(f"utilisation {gpu['util_pct']}%")
    if gpu.get("other_processes"):
        parts.append(f"{gpu['other_processes']} other process(es) on the GPU")
    return "; ".join(parts) or "NVML shows no throttling or other process: its inputs or kernels differ"
