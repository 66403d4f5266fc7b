"""``python launch.py env``: what this machine offers a distributed job.

Everything is read without creating a CUDA context (GPU facts come from NVML), so it is
safe to run beside a training job and on machines without a GPU, where it says so.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import sys
from collections.abc import Mapping
from typing import Any

from distrib.context import LAUNCHER_VARS
from distrib.devices import AppliedEnv, Inventory, gpu_table

SHOWN_PREFIXES = ("CUDA_", "NCCL_", "TORCH", "SLURM_", "PYTORCH_")
SHOWN_NAMES = LAUNCHER_VARS


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # a missing library is a fact to report, not a crash
        return f"unavailable ({type(e).__name__}: {e})"


def torch_versions() -> dict[str, Any]:
    """torch/CUDA/cuDNN/NCCL versions as built; none of these starts CUDA."""
    import torch

    return {
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda_build": torch.version.cuda or "cpu-only build",
        "cudnn": _safe(lambda: torch.backends.cudnn.version()),
        "nccl": _safe(lambda: ".".join(str(x) for x in torch.cuda.nccl.version())),
    }


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    """True when ``port`` can be bound (what a rendezvous store on it needs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def shm_info(path: str = "/dev/shm") -> dict[str, Any]:
    """/dev/shm size: DataLoader workers pass batches through it (Docker's default is 64 MB)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return {"path": path, "error": e.strerror}
    return {"path": path, "total_mib": usage.total // 2**20, "free_mib": usage.free // 2**20}


def collect(inventory: Inventory, applied: AppliedEnv, env: Mapping[str, str]) -> dict[str, Any]:
    """The whole report as plain data (printed as text or JSON)."""
    import torch

    shown = {k: v for k, v in sorted(env.items()) if k.startswith(SHOWN_PREFIXES) or k in SHOWN_NAMES}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **torch_versions(),
        "nvml": {
            "available": inventory.source == "nvml",
            "error": inventory.nvml_error,
            "driver": inventory.driver_version,
            "source": inventory.source,
        },
        "gpu_count": inventory.count,
        "gpus": gpu_table(inventory, env),
        "cuda_env": {
            "applied": applied.env,
            "applied_before_torch_import": not applied.torch_loaded_before,
            "cuda_initialized_in_this_process": torch.cuda.is_initialized(),
        },
        "env": shown,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "dev_shm": shm_info(),
        "port_29500_free": port_free(29500),
        "memory_monitor": memory_sources(inventory),
    }


def memory_sources(inventory: Inventory) -> dict[str, str]:
    """What the memory monitor can read on this machine, and why not where it cannot."""
    from distrib.memory.probe import _glibc_mallinfo2

    try:
        import psutil  # noqa: F401

        host = "RSS/USS via psutil"
    except ImportError:
        host = "not monitored: psutil is not installed"
    gpu = (
        "torch allocator + NVML process/device memory (by UUID)"
        if inventory.source == "nvml"
        else f"not monitored: {inventory.nvml_error or 'no NVIDIA GPU'}"
    )
    return {
        "allocator": "glibc mallinfo2 (in-use bytes, heap)"
        if _glibc_mallinfo2() is not None
        else "not monitored: this libc has no mallinfo2; RSS only",
        "host": host,
        "gpu": gpu,
    }


def render_text(info: Mapping[str, Any]) -> str:
    """Human-readable form of :func:`collect`'s report."""
    lines = [
        f"python        {info['python']}  ({info['platform']})",
        f"torch         {info['torch']}   torchvision {info['torchvision']}",
        f"CUDA (build)  {info['cuda_build']}   cuDNN {info['cudnn']}   NCCL {info['nccl']}",
    ]
    nvml = info["nvml"]
    if nvml["available"]:
        lines.append(f"NVML          available, driver {nvml['driver']}")
    else:
        lines.append(f"NVML          not available: {nvml['error']}")
    if info["gpus"]:
        lines.append("GPUs          cuda  pci  nvml  bus id        name / uuid / memory used/total MiB")
        for g in info["gpus"]:
            cuda = "-" if g["cuda_index"] is None else str(g["cuda_index"])
            lines.append(
                f"              {cuda:>4}  {g['pci_index']:>3}  {g['nvml_index']:>4}  {g['pci_bus_id']}  "
                f"{g['name']} {g['uuid']} {g['memory_used_mib']}/{g['memory_total_mib']}"
            )
    else:
        lines.append("GPUs          none: this machine runs on the CPU (gloo backend)")
    ce = info["cuda_env"]
    lines.append(
        "CUDA env      "
        + " ".join(f"{k}={v}" for k, v in ce["applied"].items())
        + f"; set before torch import: {'yes' if ce['applied_before_torch_import'] else 'NO'}"
        + f"; CUDA initialised here: {'yes' if ce['cuda_initialized_in_this_process'] else 'no'}"
    )
    for k, v in info["env"].items():
        lines.append(f"env           {k}={v}")
    shm = info["dev_shm"]
    shm_text = shm.get("error") or f"{shm['free_mib']} MiB free of {shm['total_mib']} MiB"
    lines += [
        f"CPUs          {info['cpu_count']} (usable by this process: {info['cpu_affinity']})",
        f"/dev/shm      {shm_text}",
        f"port 29500    {'free' if info['port_29500_free'] else 'IN USE (torchrun default)'}",
    ]
    mem = info["memory_monitor"]
    lines.append(f"memory        host: {mem['host']}; allocator: {mem['allocator']}; GPU: {mem['gpu']}")
    return "\n".join(lines)


def main_env(inventory: Inventory, applied: AppliedEnv, as_json: bool) -> int:
    """Print the report; exit status 0 (a machine without GPU is not an error)."""
    import json

    info = collect(inventory, applied, os.environ)
    sys.stdout.write((json.dumps(info, indent=2) if as_json else render_text(info)) + "\n")
    return 0
