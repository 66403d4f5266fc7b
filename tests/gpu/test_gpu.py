"""The same checks as tests/dist, on a real GPU with a real NVML (skipped without CUDA).

Run by tests/gpu/check.sh on a GPU machine. One GPU is enough: a real nccl group needs a
GPU per rank, so the multi-rank nccl case is exercised when two or more GPUs exist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import LAUNCH, PROBE, REPO, TORCHRUN, clean_env, launch, rank_reports, run

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_env_reads_real_nvml_without_a_cuda_context() -> None:
    res = launch("env", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["nvml"]["available"] and info["gpu_count"] >= 1
    assert info["cuda_env"]["cuda_initialized_in_this_process"] is False
    g = info["gpus"][0]
    assert g["uuid"].startswith(("GPU-", "MIG-")) and g["memory_total_mib"] > 0


def test_single_gpu_run_binds_cuda0_with_nccl(tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    env = clean_env(PYTHONPATH=PROBE, TORCH_IMPORT_PROBE=str(probe))
    res = launch("check", "--gpus", "0", "--set", f"run.out_dir={tmp_path / 'runs'}", env=env)
    assert res.returncode == 0, res.stderr
    (r,) = rank_reports(tmp_path / "runs")
    assert r["device"] == "cuda:0" and r["backend"] == "nccl"
    assert r["cuda_visible_devices"] == "0" and r["cuda_device_order"] == "PCI_BUS_ID"
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert all(s["CUDA_VISIBLE_DEVICES"] == "0" for s in seen)


def test_torchrun_one_rank_per_gpu_on_nccl(tmp_path: Path) -> None:
    n = torch.cuda.device_count()
    res = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            str(n),
            LAUNCH,
            "check",
            "--set",
            f"run.out_dir={tmp_path}",
        ]
    )
    assert res.returncode == 0, res.stderr
    reports = rank_reports(tmp_path)
    assert [r["device"] for r in reports] == [f"cuda:{i}" for i in range(n)]
    assert all(r["backend"] == "nccl" and r["all_reduce"] == n * (n + 1) / 2 for r in reports)


def test_collectives_on_cuda_alone() -> None:
    res = run(
        [sys.executable, str(REPO / "tests" / "dist" / "collectives_worker.py")],
        env=clean_env(PYTHONPATH=str(REPO)),
    )
    assert res.returncode == 0, res.stderr


def test_gpu_id_beyond_real_gpus_is_refused(tmp_path: Path) -> None:
    bad = str(torch.cuda.device_count())
    res = launch("check", "--gpus", bad, "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and f"GPU id {bad} does not exist" in res.stderr


def test_more_processes_than_gpus_is_refused_before_spawning(tmp_path: Path) -> None:
    n = torch.cuda.device_count()
    res = launch("check", "--nproc-per-node", str(n + 1), "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and "nccl needs one GPU per process" in res.stderr
