"""A fake ``pynvml`` (the nvidia-ml-py module) for machines without an NVIDIA driver.

Only what distrib/devices.py calls. The GPU count comes from FAKE_NVML_GPUS so tests
running real subprocesses (launcher and workers) see the same fake devices. NVML lists
devices in an order that is *not* PCI order here, to exercise the mapping.
"""

import os


class NVMLError(Exception):
    pass


class _Mem:
    def __init__(self, total, used):
        self.total, self.used, self.free = total, used, total - used


class _Pci:
    def __init__(self, bus):
        self.busId = bus


def _buses():
    n = int(os.environ.get("FAKE_NVML_GPUS", "2"))
    # reversed: NVML index 0 sits on the highest bus
    return [f"00000000:{0x10 * (n - i):02X}:00.0" for i in range(n)]


def nvmlInit():
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError("Driver Not Loaded")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(_buses())


def nvmlDeviceGetHandleByIndex(i):
    return i


def nvmlDeviceGetPciInfo(h):
    return _Pci(_buses()[h].encode())


def nvmlDeviceGetUUID(h):
    return f"GPU-fake-{h:04d}"


def nvmlDeviceGetName(h):
    return "Fake GPU"


def nvmlDeviceGetMemoryInfo(h):
    return _Mem(80 * 2**30, (h + 1) * 2**20)


def nvmlSystemGetDriverVersion():
    return "999.99"


# --- what the memory monitor reads (distrib/memory/probe.py)
nvmlMemory_v2 = 2


class _Proc:
    def __init__(self, pid, used):
        self.pid, self.usedGpuMemory = pid, used


def nvmlDeviceGetHandleByUUID(uuid):
    n = len(_buses())
    for h in range(n):
        if nvmlDeviceGetUUID(h) == uuid:
            return h
    raise NVMLError("Not Found")


def nvmlDeviceGetComputeRunningProcesses(h):
    """FAKE_NVML_PROCS='pid:bytes,pid:' (an empty size stands for a container hiding it)."""
    out = []
    for item in filter(None, os.environ.get("FAKE_NVML_PROCS", "").split(",")):
        pid, _, used = item.partition(":")
        out.append(_Proc(int(pid), int(used) if used else None))
    return out
