"""GPU inventory, device order and visibility.

Why this exists: CUDA numbers devices "fastest first" unless ``CUDA_DEVICE_ORDER`` is
``PCI_BUS_ID``, so the ids nvidia-smi shows (PCI order) and the ids torch uses can
disagree; ``CUDA_VISIBLE_DEVICES`` is read once, when CUDA initialises, and a bad id
silently hides every device after it. So ``launch.py`` plans both variables from
``--gpus`` *before torch is imported*, validates ids against the GPUs NVML reports
(NVML creates no CUDA context), and checks afterwards that torch agrees.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrib.errors import LaunchError

PROC_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU as the driver reports it."""

    nvml_index: int
    pci_index: int  # index under CUDA_DEVICE_ORDER=PCI_BUS_ID with every GPU visible
    pci_bus_id: str  # normalised "0000:3b:00.0"
    uuid: str = ""
    name: str = ""
    memory_total: int = 0  # bytes
    memory_used: int = 0  # bytes


@dataclass(frozen=True)
class Inventory:
    """The GPUs on this host, and where that knowledge came from."""

    gpus: tuple[GpuInfo, ...] = ()
    source: str = "none"  # nvml | procfs | none
    nvml_error: str = ""  # why NVML was unusable ("" when it worked)
    driver_version: str = ""

    @property
    def count(self) -> int:
        return len(self.gpus)

    def describe(self) -> str:
        if self.count:
            return f"{self.count} GPU(s) via {self.source}"
        return f"no NVIDIA GPU found ({self.nvml_error or 'NVML reports none'})"


def normalise_bus_id(bus_id: str | bytes) -> str:
    """'00000000:3B:00.0' (NVML) and '0000:3b:00.0' (procfs) -> '0000:3b:00.0'."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    domain, rest = text.strip().lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def _bus_key(bus_id: str) -> tuple[int, ...]:
    domain, bus, devfn = bus_id.split(":")
    dev, fn = devfn.split(".")
    return (int(domain, 16), int(bus, 16), int(dev, 16), int(fn, 16))


def nvml_failure_reason(exc: BaseException) -> str:
    """Turn an NVML/import failure into a sentence a user can act on."""
    if isinstance(exc, ImportError):
        return "pynvml is not importable (pip install nvidia-ml-py)"
    text = str(exc) or type(exc).__name__
    if "Library Not Found" in text or "LibraryNotFound" in type(exc).__name__:
        return "NVML library libnvidia-ml.so.1 not found: no NVIDIA driver on this machine"
    if "Driver Not Loaded" in text:
        return "the NVIDIA driver is installed but not loaded"
    return f"NVML failed: {text}"


def _nvml_gpus() -> tuple[list[tuple[int, str, str, str, int, int]], str]:
    import pynvml  # nvidia-ml-py; imported lazily so a missing driver costs nothing

    pynvml.nvmlInit()
    try:
        rows = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = pynvml.nvmlDeviceGetName(h)
            rows.append(
                (
                    i,
                    normalise_bus_id(bus),
                    uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name.decode() if isinstance(name, bytes) else name,
                    int(mem.total),
                    int(mem.used),
                )
            )
        driver = pynvml.nvmlSystemGetDriverVersion()
        return rows, driver.decode() if isinstance(driver, bytes) else driver
    finally:
        pynvml.nvmlShutdown()


def _with_pci_order(rows: Sequence[tuple[int, str, str, str, int, int]]) -> tuple[GpuInfo, ...]:
    order = sorted(rows, key=lambda r: _bus_key(r[1]))
    pci_index = {r[1]: i for i, r in enumerate(order)}
    return tuple(
        GpuInfo(nvml, pci_index[bus], bus, uuid, name, tot, used) for nvml, bus, uuid, name, tot, used in rows
    )


def query_inventory(proc_gpus: Path = PROC_GPUS) -> Inventory:
    """List GPUs through NVML, else the driver's /proc entries, else none (with why)."""
    try:
        rows, driver = _nvml_gpus()
        return Inventory(_with_pci_order(rows), "nvml", "", driver)
    except Exception as e:  # NVMLError has many subclasses; all mean "not usable"
        reason = nvml_failure_reason(e)
    if proc_gpus.is_dir():
        buses = [normalise_bus_id(p.name) for p in proc_gpus.iterdir()]
        rows = [(i, b, "", "", 0, 0) for i, b in enumerate(sorted(buses, key=_bus_key))]
        if rows:
            return Inventory(_with_pci_order(rows), "procfs", reason)
    return Inventory((), "none", reason)


# --------------------------------------------------------------------------- planning


def parse_gpu_ids(spec: str | Sequence[int | str]) -> tuple[int, ...]:
    """'1,0' or [1, 0] -> (1, 0); non-integers, negatives and duplicates are errors."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if isinstance(spec, str) and spec.strip() == "":
        return ()
    ids: list[int] = []
    for item in items:
        text = str(item)
        try:
            value = int(text)
        except ValueError:
            raise LaunchError(
                f"--gpus {_show(spec)}: {text!r} is not a GPU id; give integers like --gpus 0,1"
            ) from None
        if value < 0:
            raise LaunchError(
                f"--gpus {_show(spec)}: GPU id {value} is negative; ids start at 0 "
                "(see `python launch.py env`)"
            )
        if value in ids:
            raise LaunchError(f"--gpus {_show(spec)}: GPU id {value} is listed twice; list each once")
        ids.append(value)
    return tuple(ids)


def _show(spec: str | Sequence[int | str]) -> str:
    return spec if isinstance(spec, str) else ",".join(str(s) for s in spec)


@dataclass(frozen=True)
class DevicePlan:
    """What launch.py will write into the environment, decided before torch loads."""

    gpus: tuple[int, ...]
    env: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    visible_count: int | None = None  # GPUs each process will see; None = unknown


def _count_visible(value: str, present: int) -> int | None:
    """How many GPUs a user-set CUDA_VISIBLE_DEVICES exposes (None if not integer ids)."""
    items = [s.strip() for s in value.split(",") if s.strip()]
    count = 0
    for item in items:
        if not item.lstrip("-").isdigit():
            return None  # UUIDs / MIG ids: let CUDA decide, verify after import
        if not 0 <= int(item) < present:
            break  # CUDA stops at the first invalid id
        count += 1
    return count


def plan_devices(gpus: Sequence[int], env: Mapping[str, str], inventory: Inventory) -> DevicePlan:
    """Decide CUDA_DEVICE_ORDER / CUDA_VISIBLE_DEVICES; pure, so every case is unit-tested."""
    notes: list[str] = []
    out = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    old_order = env.get("CUDA_DEVICE_ORDER")
    if old_order and old_order != "PCI_BUS_ID":
        notes.append(
            f"CUDA_DEVICE_ORDER={old_order} from the environment replaced by PCI_BUS_ID "
            "so GPU ids match nvidia-smi"
        )
    old_visible = env.get("CUDA_VISIBLE_DEVICES")
    if not gpus:
        visible = inventory.count if old_visible is None else _count_visible(old_visible, inventory.count)
        return DevicePlan((), out, tuple(notes), visible)
    ids = ",".join(str(g) for g in gpus)
    for g in gpus:
        if g >= inventory.count:
            have = (
                f"only {inventory.count} GPU(s) are present (ids 0-{inventory.count - 1})"
                if inventory.count
                else inventory.describe()
            )
            raise LaunchError(
                f"--gpus {ids}: GPU id {g} does not exist; {have}. "
                "Pick ids from `python launch.py env`, or drop --gpus to run on the CPU."
            )
    if old_visible is not None and old_visible != ids:
        notes.append(f"--gpus {ids} overrides CUDA_VISIBLE_DEVICES={old_visible} from the environment")
    out["CUDA_VISIBLE_DEVICES"] = ids
    return DevicePlan(tuple(gpus), out, tuple(notes), len(gpus))


@dataclass(frozen=True)
class AppliedEnv:
    """Proof of ordering: what was set, and whether torch/CUDA had loaded already."""

    env: dict[str, str]
    torch_loaded_before: bool
    cuda_initialized_before: bool


def apply_device_env(plan: DevicePlan, environ: MutableMapping[str, str] = os.environ) -> AppliedEnv:
    """Write the plan into ``environ``; refuse if CUDA already started with other values."""
    torch_mod: Any = sys.modules.get("torch")
    cuda_started = bool(torch_mod is not None and torch_mod.cuda.is_initialized())
    changed = {k: v for k, v in plan.env.items() if environ.get(k) != v}
    if cuda_started and changed:
        raise LaunchError(
            "CUDA was initialised in this process before "
            + ", ".join(f"{k}={v}" for k, v in changed.items())
            + " could be applied, so CUDA would ignore it. Run launch.py as the entry script "
            "(python launch.py / torchrun launch.py) and do not touch CUDA before it starts."
        )
    environ.update(plan.env)
    return AppliedEnv(dict(plan.env), torch_mod is not None, cuda_started)


def verify_cuda_visibility(plan: DevicePlan, cuda_count: int) -> None:
    """After torch is imported: the GPUs torch sees must be the ones we planned."""
    if plan.visible_count is None or cuda_count == 0:
        return
    if cuda_count != plan.visible_count:
        raise LaunchError(
            f"torch sees {cuda_count} CUDA device(s) but {plan.visible_count} were planned "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
            "Check the ids with `python launch.py env`; CUDA ignores every id after an invalid one."
        )


# --------------------------------------------------------------------------- reporting


def gpu_table(inventory: Inventory, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per GPU: CUDA index (as this process would see it), NVML index, bus id, UUID."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    order = [g.pci_index for g in inventory.gpus]
    if visible is not None:
        order = []
        for item in (s.strip() for s in visible.split(",") if s.strip()):
            match = [
                g.pci_index
                for g in inventory.gpus
                if (item.isdigit() and g.pci_index == int(item)) or (g.uuid and g.uuid.startswith(item))
            ]
            if not match:
                break
            order.append(match[0])
    rows = []
    for g in sorted(inventory.gpus, key=lambda g: g.pci_index):
        rows.append(
            {
                "cuda_index": order.index(g.pci_index) if g.pci_index in order else None,
                "pci_index": g.pci_index,
                "nvml_index": g.nvml_index,
                "pci_bus_id": g.pci_bus_id,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_mib": g.memory_total // 2**20,
                "memory_used_mib": g.memory_used // 2**20,
            }
        )
    return rows
