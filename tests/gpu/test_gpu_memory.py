"""The memory monitor on CUDA: a real leak, a healthy run, NVML against torch, the UUID map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, clean_env, launch

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
USER = str(REPO / "tests" / "fakes" / "scripts" / "user_train.py")


def memcheck(tmp_path: Path, leak: str, steps: int, *extra: str):
    env = clean_env(LEAK=leak, DEVICE="cuda")
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=m")
    return launch("memcheck", *extra, *sets, "--", USER, str(steps), env=env, timeout=400)


def reports(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("memory_rank*.json"))]


def test_a_cuda_leak_is_found_and_called_kept_tensors(tmp_path: Path) -> None:
    res = memcheck(tmp_path, "graph", 1000)
    assert res.returncode == 3, res.stderr[-3000:]
    (r,) = reports(tmp_path / "m")
    assert (
        r["device"] == "cuda:0" and r["verdict"]["cause"] == "tensors" and r["verdict"]["series"] == "alloc"
    )
    assert r["steps"] <= 300 and "with grad_fn AddmmBackward0" in res.stdout


def test_a_healthy_cuda_run_is_not_flagged(tmp_path: Path) -> None:
    res = memcheck(tmp_path, "none", 500)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    (r,) = reports(tmp_path / "m")
    assert not r["leak"] and r["peak"]["alloc"] > 0 and r["peak"]["reserved"] >= r["peak"]["alloc"]


def test_nvml_process_memory_covers_torchs_reserve() -> None:
    from distrib.memory.probe import Probe

    keep = torch.ones(64 * 2**20, device="cuda:0")  # 256 MiB reserved by torch
    probe = Probe.open("cuda:0", 0)
    fast, slow = probe.fast(), probe.slow()
    assert fast.reserved >= keep.numel() * 4 and probe.gpu_uuid.startswith(("GPU-", "MIG-"))
    if slow.gpu_process is None:
        pytest.skip("NVML hides per-process memory here (a container): the device figures are used")
    assert slow.gpu_process >= fast.reserved
    assert slow.gpu_device >= slow.gpu_process and slow.gpu_total > slow.gpu_device


def test_the_uuid_map_picks_the_gpu_that_gpus_named(tmp_path: Path) -> None:
    info = json.loads(launch("env", "--json").stdout)
    last = max(g["pci_index"] for g in info["gpus"])  # nvidia-smi id of the last GPU
    uuid = next(g["uuid"] for g in info["gpus"] if g["pci_index"] == last)
    env = clean_env(LEAK="none", DEVICE="cuda")
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=u")
    res = launch("run", "--gpus", str(last), *sets, USER, "30", env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (r,) = reports(tmp_path / "u")
    assert r["gpu_uuid"] == uuid
