"""The step breakdown on CUDA (events read a step later) and NVML's clocks and throttle reasons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import launch

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_steps_are_broken_down_from_events(tmp_path: Path) -> None:
    """One GPU, the demo data: every step's compute and optimizer come from CUDA events."""
    sets = [f"run.out_dir={tmp_path}", "run.name=t", "train.epochs=2", "timing.window=5",
            f"data.csv={tmp_path / 'demo' / 'labels.csv'}", f"data.images={tmp_path / 'demo' / 'images'}",
            f"data.cache_dir={tmp_path / 'cache'}", f"data.stats_cache={tmp_path / 'stats'}"]  # fmt: skip
    res = launch("train", *(a for s in sets for a in ("--set", s)), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    rows = list(csv.DictReader((tmp_path / "t" / "timing_rank0.csv").open()))
    assert len(rows) == summary["global_step"]
    assert all(float(r["compute"]) > 0 and float(r["optimizer"]) > 0 and float(r["rest"]) >= 0 for r in rows)
    (medians,) = summary["timing"]["median_s_per_rank"]
    assert 0 < medians["compute"] < medians["wall"] * 5, medians  # GPU time, read a step later


def test_nvml_reads_clocks_throttle_reasons_and_utilisation() -> None:
    from distrib.context import DistContext
    from distrib.timing.watch import gpu_reading

    ctx = DistContext.from_env({}, cuda_device_count=torch.cuda.device_count())
    assert ctx.is_cuda
    reading = gpu_reading(ctx)
    assert reading["sm_clock_mhz"] > 0 and reading["sm_clock_max_mhz"] >= reading["sm_clock_mhz"]
    assert isinstance(reading["throttle"], list) and 0 <= reading["util_pct"] <= 100
    assert reading["other_processes"] >= 0
    print(f"NVML: {reading}")


def test_a_users_cuda_script_under_run_is_broken_down(tmp_path: Path) -> None:
    """run on one GPU: the script's own model and optimizer, timed through torch's global hooks with
    CUDA events (compute and optimizer from the GPU's clock, read a step later)."""
    from conftest import REPO, clean_env

    script = str(REPO / "tests" / "fakes" / "scripts" / "user_train.py")
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=s")
    res = launch("run", *sets, script, "60", env=clean_env(DEVICE="cuda", LOADER="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    timing = json.loads((tmp_path / "s" / "summary.json").read_text())["timing"]
    (medians,) = timing["median_s_per_rank"]
    assert medians["steps"] == 60 and medians["compute"] > 0 and medians["optimizer"] > 0, medians
    assert timing["straggler_check"] == "not judged: one rank"
    print(f"run on CUDA, medians (s): {medians}")
