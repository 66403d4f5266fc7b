"""Leak detection on per-step memory series: pure functions (numpy), no torch, no I/O.

A leak is *sustained* growth, and the tests here are chosen so the usual shapes of
healthy memory do not pass them:
  - a robust slope (Theil-Sen: the median of pairwise slopes) above a rate threshold,
    and a total growth over the window above a size threshold;
  - a Mann-Kendall trend test (growth that noise cannot explain);
  - growth in every part of the window (the medians of consecutive quarters rise), so a
    buffer allocated once and kept (a step) or the caching allocator's sawtooth is not
    called a leak, while a leak that grows all along is.
Then :func:`classify` says what is growing, in the order a reader would check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

MAX_POINTS = 200  # Theil-Sen and Mann-Kendall are quadratic: longer windows are thinned evenly
SEGMENTS = 4


@dataclass(frozen=True)
class Thresholds:
    """What counts as a leak (memory.* config keys)."""

    warmup_steps: int = 20
    min_steps: int = 40
    rate: float = 1024.0  # bytes per step
    total: float = 1 << 20  # bytes over the window
    z: float = 2.33  # Mann-Kendall, one-sided p < 0.01


@dataclass(frozen=True)
class Trend:
    """Growth of one series over the judged window."""

    slope: float  # bytes per step (Theil-Sen)
    growth: float  # slope x window length, bytes
    z: float  # Mann-Kendall statistic (> 0: rising)
    rising_parts: int  # of SEGMENTS - 1 consecutive quarter-median increases
    steps: int  # points judged

    def sustained(self, th: Thresholds) -> bool:
        return (
            self.steps >= th.min_steps
            and self.slope >= th.rate
            and self.growth >= th.total
            and self.z >= th.z
            and self.rising_parts == SEGMENTS - 1
        )


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) <= MAX_POINTS:
        return x, y
    idx = np.round(np.linspace(0, len(x) - 1, MAX_POINTS)).astype(int)
    return x[idx], y[idx]


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The median of the slopes between every pair of points (robust to outliers)."""
    x, y = _thin(xs, ys)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    return float(np.median((y[j] - y[i])[keep] / dx[keep])) if keep.any() else 0.0


def mann_kendall_z(ys: Sequence[float]) -> float:
    """Mann-Kendall trend statistic, normal approximation (ties counted as no change)."""
    y = _thin(np.arange(len(ys)), ys)[1]
    n = len(y)
    if n < 3:
        return 0.0
    i, j = np.triu_indices(n, k=1)
    s = float(np.sign(y[j] - y[i]).sum())
    var = n * (n - 1) * (2 * n + 5) / 18
    if s == 0:
        return 0.0
    return (s - math.copysign(1, s)) / math.sqrt(var)


def _median(v: Sequence[float]) -> float:
    return float(np.median(np.asarray(v, dtype=np.float64)))


def rising_parts(ys: Sequence[float], min_rise: float) -> int:
    """How many of the consecutive quarter medians rise by more than ``min_rise``."""
    n = len(ys)
    if n < SEGMENTS * 2:
        return 0
    meds = [_median(ys[k * n // SEGMENTS : (k + 1) * n // SEGMENTS]) for k in range(SEGMENTS)]
    return sum(1 for a, b in zip(meds, meds[1:], strict=False) if b - a > min_rise)


def trend(steps: Sequence[int], values: Sequence[float | None], th: Thresholds) -> Trend | None:
    """The trend of one series after warm-up; None when the series was not measured."""
    pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and s >= th.warmup_steps]
    if len(pts) < 3:
        return None
    xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
    q = max(1, len(ys) // SEGMENTS)
    if _median(ys[-q:]) - _median(ys[:q]) < th.total / 2:  # cheap first look: flat enough, no tests
        return Trend(0.0, 0.0, 0.0, 0, len(pts))
    slope = theil_sen(xs, ys)
    span = xs[-1] - xs[0]
    # each quarter should rise by a good part of what the slope predicts for it
    rise = max(slope * span / SEGMENTS * 0.25, 0.0)
    return Trend(slope, slope * span, mann_kendall_z(ys), rising_parts(ys, rise), len(pts))


# --------------------------------------------------------------------------- classification

# The series classify() reads (bytes), in the order that names a cause best. On CUDA
# alloc/reserved are torch's allocator and host is glibc's in-use bytes; on the CPU
# alloc/reserved are glibc's in-use bytes and heap (arena + mmap), and there is no host.
ORDER = (
    ("alloc", "tensors"),
    ("reserved", "fragmentation"),
    ("gpu_process", "outside_torch_gpu"),
    ("gpu_device", "other_process"),
    ("host", "outside_torch"),
    ("workers_rss", "workers"),
)
CAUSES = {
    "tensors": "tensors kept alive from step to step (allocated memory grows)",
    "outside_torch": "memory outside torch's tensors (numpy arrays, C extensions, buffers)",
    "fragmentation": "the allocator's reserve grows while allocated memory is flat (fragmentation)",
    "heap_pinned": "glibc's heap grows while its in-use bytes stay flat: small allocations kept from step "
    "to step pin the heap above the activations freed between them (fragmentation)",
    "outside_torch_gpu": "GPU memory of this process outside torch (NCCL, cuDNN/cuBLAS workspaces, another "
    "CUDA context, CuPy)",
    "other_process": "another process on this GPU (device memory grows while this process is flat)",
    "workers": "DataLoader worker processes (their RSS grows: copy-on-read of Python objects, pytorch#13246)",
}
ADVICE = {
    "tensors": "keep .item() or .detach() of what you store, not the tensor with its graph",
    "fragmentation": "try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or fixed input sizes",
    "heap_pinned": "keep .item() or .tolist() of per-step values, not small tensors; or preallocate what "
    "you keep (a tensor of n_steps written in place)",
    "other_process": "see `nvidia-smi` for the process; memory.require_free = true refuses such GPUs",
    "workers": "hold dataset samples in numpy arrays or tensors, not Python lists or dicts; or fewer workers",
    "outside_torch": "look for arrays or buffers appended every step",
    "outside_torch_gpu": "check for CUDA memory allocated outside torch, or a growing number of NCCL groups",
}


@dataclass(frozen=True)
class Verdict:
    """What a rank's memory did: a leak (with its cause), no leak, or not judged (too few points)."""

    leak: bool
    cause: str = ""  # a key of CAUSES
    series: str = ""  # the series that grew
    rate: float = 0.0  # bytes per step
    growth: float = 0.0  # bytes over the window
    steps: int = 0
    unjudged: tuple[tuple[str, int], ...] = ()  # (series, points) measured too few times to judge

    @property
    def judged(self) -> bool:
        """Some series had enough points to judge (a "no" is then evidence, not silence)."""
        return self.leak or self.steps > 0

    @property
    def text(self) -> str:
        if self.leak:
            return CAUSES.get(self.cause, self.cause)
        if not self.judged:
            return f"not judged: too few samples ({self.steps_seen})"
        return "no sustained growth"

    @property
    def steps_seen(self) -> int:
        return max((n for _, n in self.unjudged), default=0)

    @property
    def short(self) -> str:
        """The verdict table's cell: YES, no, or not judged (with what was not judged)."""
        if self.leak:
            return "YES"
        if not self.judged:
            return f"not judged: too few samples ({self.steps_seen})"
        return "no" + "".join(f"; {name} not judged: too few samples ({n})" for name, n in self.unjudged)


# An allocator's reserve drifts up on healthy runs (glibc's heap by a few KiB per step,
# torch's in whole segments); it counts as fragmentation only when it grows much faster.
SCALE = {"reserved": 8.0}


def classify(
    steps: Sequence[int],
    series: Mapping[str, Sequence[float | None]],
    th: Thresholds,
    allowance: Mapping[str, float] | None = None,
) -> Verdict:
    """The first growing series in ORDER, and the cause it stands for.

    ``allowance`` adds bytes a series may grow by for a known, bounded reason (the process
    group's flight recorder filling its ring buffer) before growth counts.
    """
    trends = {name: trend(steps, vals, th) for name, vals in series.items()}
    allowance = allowance or {}
    for name, cause in ORDER:
        t = trends.get(name)
        k = SCALE.get(name, 1.0)
        limits = replace(th, rate=th.rate * k, total=th.total * k + allowance.get(name, 0.0))
        if t is not None and t.sustained(limits):
            return Verdict(True, cause, name, t.slope, t.growth, t.steps)
    judged = max((t.steps for t in trends.values() if t is not None and t.steps >= th.min_steps), default=0)
    return Verdict(False, steps=judged, unjudged=too_few(steps, series, th))


def too_few(
    steps: Sequence[int], series: Mapping[str, Sequence[float | None]], th: Thresholds
) -> tuple[tuple[str, int], ...]:
    """The series measured (after warm-up) fewer than ``min_steps`` times: their "no" would be silence."""
    out = []
    for name, vals in series.items():
        n = sum(1 for s, v in zip(steps, vals, strict=True) if v is not None and s >= th.warmup_steps)
        if 0 < n < th.min_steps or (n == 0 and any(v is not None for v in vals)):
            out.append((name, n))
    return tuple(out)


def steps_to_oom(rate: float, headroom: float | None) -> int | None:
    """Steps until ``headroom`` bytes are used at ``rate`` bytes per step (None: unknown)."""
    if headroom is None or rate <= 0:
        return None
    return max(0, int(headroom / rate))
