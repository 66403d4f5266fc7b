"""Where memory readings come from: torch's CUDA allocator, NVML, glibc, /proc (psutil).

Each source is opened once; one that cannot be used says why (``Probe.limits``) and is
then skipped without another word, so a machine without a driver, a container that
hides NVML process memory, or a libc without ``mallinfo2`` costs one log line, never a
warning per step.

Why glibc's counters: RSS alone misleads on the CPU. glibc keeps freed memory (dynamic
mmap threshold, fragmentation), so RSS climbs on a healthy run; its in-use bytes
(``uordblks + hblkhd``) play the part of torch's "allocated" and its heap
(``arena + hblkhd``) the part of "reserved".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CGROUP = Path("/sys/fs/cgroup")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]  # fmt: skip


def _glibc_mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (2.33+), or None: musl, macOS and old glibc do not have it."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


@dataclass
class Fast:
    """Readings cheap enough for every step boundary."""

    alloc: int | None = None  # torch CUDA allocated (CUDA ranks)
    reserved: int | None = None  # torch CUDA reserved
    peak: int | None = None  # torch CUDA peak allocated since the last reset
    host: int | None = None  # glibc in-use bytes
    heap: int | None = None  # glibc arena + mmapped
    rss: int = 0


@dataclass
class Slow:
    """Readings taken by the background sampler (they cost a /proc walk or a driver call)."""

    workers_rss: int = 0  # DataLoader workers and other children
    gpu_process: int | None = None  # NVML: this process on its GPU
    gpu_device: int | None = None  # NVML: the whole GPU
    gpu_total: int | None = None
    uss: int | None = None


@dataclass
class Probe:
    """One rank's memory sources; built once, then read at every step and in the background."""

    device: str = "cpu"
    limits: list[str] = field(default_factory=list)  # what is not monitored, and why
    _proc: Any = None
    _mallinfo: Any = None
    _nvml: Any = None  # (pynvml module, handle, uuid)
    _statm: int | None = None  # an open /proc/self/statm
    gpu_uuid: str = ""  # the NVML UUID this rank's GPU was found by
    _last_uss: int | None = None

    @staticmethod
    def open(device: str, cuda_index: int | None) -> Probe:
        """Open every source this rank can use; ``cuda_index`` is the torch device index (or None)."""
        p = Probe(device)
        try:
            import psutil

            p._proc = psutil.Process()
        except ImportError:
            p.limits.append("host RSS/USS: psutil is not installed (pip install psutil)")
        try:
            p._statm = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:  # not Linux: psutil's reading
            p._statm = None
        p._mallinfo = _glibc_mallinfo2()
        if p._mallinfo is None:
            p.limits.append(
                "allocator in-use bytes: this libc has no mallinfo2 (not glibc >= 2.33); RSS only"
            )
        if cuda_index is None:
            p.limits.append("GPU memory (torch allocator, NVML): this rank runs on the CPU")
        else:
            p._nvml = _open_nvml(cuda_index, p.limits)
            p.gpu_uuid = p._nvml[2] if p._nvml else ""
        return p

    def fast(self) -> Fast:
        f = Fast()
        if self.device.startswith("cuda"):
            import torch

            stats = torch.cuda.memory_stats(self.device)
            f.alloc = stats.get("allocated_bytes.all.current", 0)
            f.reserved = stats.get("reserved_bytes.all.current", 0)
            f.peak = stats.get("allocated_bytes.all.peak", 0)
        if self._mallinfo is not None:
            m = self._mallinfo()
            f.host, f.heap = m.uordblks + m.hblkhd, m.arena + m.hblkhd
        f.rss = self._rss()
        return f

    def _rss(self) -> int:
        """Resident bytes from /proc/self/statm through a descriptor kept open (a few us; psutil: ~12)."""
        if self._statm is not None:
            try:
                return int(os.pread(self._statm, 128, 0).split()[1]) * PAGE
            except (OSError, ValueError, IndexError):
                self._statm = None
        return self._proc.memory_info().rss if self._proc is not None else 0

    def slow(self, with_uss: bool = False) -> Slow:
        s = Slow(uss=self._last_uss)
        if self._proc is not None:
            s.workers_rss = _children_rss(self._proc)
            if with_uss:  # reads all of smaps: every tenth sample, the last value in between
                s.uss = self._last_uss = _uss(self._proc)
        if self._nvml is not None:
            _read_nvml(self._nvml, s)
        return s

    def headroom(self, fast: Fast, slow: Slow) -> int | None:
        """Bytes left before out-of-memory: the GPU's free memory, else the host's (cgroup-aware)."""
        if slow.gpu_total is not None and slow.gpu_device is not None:
            return slow.gpu_total - slow.gpu_device
        if self.device.startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        return host_available()


def children_rss_fast() -> int | None:
    """RSS of this process's direct children (DataLoader workers) from /proc, in tens of microseconds:
    the main thread's children list, then one statm read per child. None where /proc has no such list."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            kids = fh.read().split()
    except OSError:
        return None
    total = 0
    for kid in kids:
        try:
            with open(f"/proc/{kid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):  # the child ended meanwhile
            continue
    return total


def _children_rss(proc: Any) -> int:
    total = 0
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except Exception:  # the child ended meanwhile
            continue
    return total


def _uss(proc: Any) -> int | None:
    try:
        return int(proc.memory_full_info().uss)
    except Exception:  # no permission to read smaps
        return None


def host_available() -> int | None:
    """Free host memory for this process: the cgroup's limit if one is set, else the machine's."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            return int(limit) - int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


# --------------------------------------------------------------------------- NVML


def _open_nvml(cuda_index: int, limits: list[str]) -> Any:
    """This rank's GPU in NVML, found by UUID (right under any CUDA_VISIBLE_DEVICES/ORDER)."""
    import torch

    from distrib.devices import nvml_failure_reason

    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = nvml_uuid(torch.cuda.get_device_properties(cuda_index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as e:
        limits.append(f"NVML process/device memory: {nvml_failure_reason(e)}")
        return None
    return pynvml, handle, uuid


def nvml_uuid(torch_uuid: object) -> str:
    """torch prints a device UUID without NVML's 'GPU-' prefix."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _read_nvml(nvml: Any, s: Slow) -> None:
    pynvml, handle = nvml[0], nvml[1]
    try:
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        except (AttributeError, TypeError, pynvml.NVMLError):  # older driver or binding: v1
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        s.gpu_device, s.gpu_total = int(mem.used), int(mem.total)
        pid = os.getpid()
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory:  # None/0 where a container hides it
                s.gpu_process = int(p.usedGpuMemory)
    except Exception:  # a transient driver error: this sample goes without
        return


def foreign_gpu_processes(cuda_index: int, ours: set[int]) -> list[tuple[int, int, str]]:
    """(pid, bytes, command) of processes on this rank's GPU that are not in ``ours``."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(torch.cuda.get_device_properties(cuda_index).uuid))
    found = []
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid not in ours:
            found.append((p.pid, int(p.usedGpuMemory or 0), _command(p.pid)))
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(not visible from here)"
