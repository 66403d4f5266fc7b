"""The benchmark toolkit every benchmark uses, and that uses none of them.

Why these pieces: the machines this runs on are shared and noisy (a block's median step
time can drift 3x within one run), so a benchmark must (1) measure its baseline in the
same run on the same data, (2) alternate the variants so drift hits both, (3) judge by
medians, and, where a small difference matters, (4) pair adjacent measurements and give
a confidence interval, so a reader can see what the figure can and cannot tell apart.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from distrib.errors import LaunchError

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent.parent


def bench_dir(out_dir: str, name: str, what: str) -> Path:
    """``<out_dir>/<name>``, or a timestamped ``<yyyymmdd-hhmmss>-bench-<what>``."""
    return Path(out_dir) / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-bench-{what}")


def torchrun_cmd() -> list[str]:
    """The ``torchrun`` console script beside this Python, else ``python -m torch.distributed.run``."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_checked(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 600) -> float:
    """Run ``cmd`` from the repository root; the seconds it took.

    A failing command is an error: its time means nothing.
    """
    start = time.perf_counter()
    res = subprocess.run(list(cmd), env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise LaunchError(
            f"benchmark command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}"
        )
    return seconds


def run_rounds(
    variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """``warmup`` untimed runs of each variant, then ``repeats`` rounds in A/B, B/A order."""
    for _ in range(warmup):  # page cache, worker start, lazy imports
        for fn in variants.values():
            fn()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(repeats):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            results[name].append(variants[name]())
            log.info("round %d/%d %-16s %.3f", i + 1, repeats, name, results[name][-1])
    return results


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


@dataclass(frozen=True)
class PairedRatio:
    """The typical ratio of paired measurements (variant / baseline) and its bootstrap interval."""

    ratio: float
    low: float
    high: float
    pairs: int
    level: float = 0.95

    def as_percent(self) -> str:
        """'+1.2% (95% CI -0.3% .. +2.5%, 240 pairs)': the overhead of the variant."""
        pct = [100 * (v - 1) for v in (self.ratio, self.low, self.high)]
        ci = f"{100 * self.level:.0f}% CI {pct[1]:+.1f}% .. {pct[2]:+.1f}%"
        return f"{pct[0]:+.1f}% ({ci}, {self.pairs} pairs)"


def trimmed_mean(values: Sequence[float], trim: float = 0.2) -> float:
    """Mean of the middle ``1 - 2 * trim`` of the values: robust to a disturbed pair, yet
    nearly as precise as the mean when nothing disturbed them (the median wastes a third)."""
    ordered = sorted(values)
    cut = int(trim * len(ordered))
    middle = ordered[cut : len(ordered) - cut] or ordered
    return sum(middle) / len(middle)


def paired_ratio(variant: Sequence[float], baseline: Sequence[float], resamples: int = 2000) -> PairedRatio:
    """Overhead of ``variant`` against ``baseline`` from pairs measured side by side.

    ``variant[i]`` and ``baseline[i]`` must be measured next to each other, so that each
    ratio cancels the machine's load at that moment. The estimate is the trimmed mean of
    the log ratios (exponentiated); a seeded percentile bootstrap over the pairs gives
    the interval.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(
            f"need as many variant as baseline measurements (> 0), got {len(variant)} and {len(baseline)}"
        )
    logs = [math.log(v / b) for v, b in zip(variant, baseline, strict=True)]
    rng = random.Random(0)
    boots = sorted(trimmed_mean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    cut = int(0.025 * resamples)
    return PairedRatio(
        math.exp(trimmed_mean(logs)), math.exp(boots[cut]), math.exp(boots[-cut - 1]), len(logs)
    )


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
