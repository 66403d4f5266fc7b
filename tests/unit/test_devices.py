"""Device planning: --gpus parsing, the CUDA variables, the inventory and its map."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from conftest import FAKE_NVML

from distrib.devices import (
    DevicePlan,
    GpuInfo,
    Inventory,
    apply_device_env,
    gpu_table,
    normalise_bus_id,
    parse_gpu_ids,
    plan_devices,
    query_inventory,
    verify_cuda_visibility,
)
from distrib.errors import LaunchError


def inventory(n: int) -> Inventory:
    gpus = tuple(GpuInfo(i, i, f"0000:{0x10 * (i + 1):02x}:00.0", f"GPU-{i}") for i in range(n))
    return Inventory(gpus, "nvml" if n else "none", "" if n else "no driver")


def test_parse_gpu_ids() -> None:
    assert parse_gpu_ids("1,0") == (1, 0)
    assert parse_gpu_ids(" 2 , 3 ") == (2, 3)
    assert parse_gpu_ids([0, 2]) == (0, 2)
    assert parse_gpu_ids("") == ()


@pytest.mark.parametrize(
    "spec, needle",
    [("0,a", "'a' is not a GPU id"), ("-1", "negative"), ("1,1", "listed twice"), ("0.5", "'0.5'")],
)
def test_parse_gpu_ids_errors_name_the_value(spec: str, needle: str) -> None:
    with pytest.raises(LaunchError) as e:
        parse_gpu_ids(spec)
    assert needle in str(e.value) and spec in str(e.value)


def test_plan_sets_order_and_visibility() -> None:
    plan = plan_devices((1, 0), {}, inventory(2))
    assert plan.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,0"}
    assert plan.visible_count == 2 and plan.notes == ()


def test_flag_overrides_exported_visibility_and_says_so() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    plan = plan_devices((0,), env, inventory(4))
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert any("overrides CUDA_VISIBLE_DEVICES=2,3" in n for n in plan.notes)
    assert any("FASTEST_FIRST" in n for n in plan.notes)


def test_without_gpus_the_user_visibility_is_kept_and_counted() -> None:
    plan = plan_devices((), {"CUDA_VISIBLE_DEVICES": "1"}, inventory(2))
    assert "CUDA_VISIBLE_DEVICES" not in plan.env and plan.visible_count == 1
    # CUDA stops at the first invalid id: "0,7,1" on 2 GPUs shows one device
    assert plan_devices((), {"CUDA_VISIBLE_DEVICES": "0,7,1"}, inventory(2)).visible_count == 1
    assert plan_devices((), {"CUDA_VISIBLE_DEVICES": "GPU-abc"}, inventory(2)).visible_count is None
    assert plan_devices((), {}, inventory(3)).visible_count == 3


def test_id_beyond_present_gpus_is_an_error() -> None:
    with pytest.raises(LaunchError) as e:
        plan_devices((0, 2), {}, inventory(2))
    assert "GPU id 2 does not exist" in str(e.value) and "ids 0-1" in str(e.value)


def test_any_id_on_a_machine_without_gpus_is_an_error_with_the_reason() -> None:
    with pytest.raises(LaunchError) as e:
        plan_devices((0,), {}, inventory(0))
    assert "no driver" in str(e.value) and "drop --gpus" in str(e.value)


def test_apply_writes_the_environment_and_records_the_order() -> None:
    env: dict[str, str] = {}
    applied = apply_device_env(plan_devices((1,), {}, inventory(2)), env)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    assert applied.torch_loaded_before == ("torch" in sys.modules)
    assert applied.cuda_initialized_before is False


def test_apply_refuses_when_cuda_already_started(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA cannot start on this machine, so stand in for a torch whose CUDA is initialised
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    with pytest.raises(LaunchError) as e:
        apply_device_env(plan_devices((1,), {}, inventory(2)), {})
    assert "CUDA_VISIBLE_DEVICES=1" in str(e.value) and "before" in str(e.value)
    # same values already in place: nothing to change, nothing to refuse
    same = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}
    assert apply_device_env(plan_devices((1,), {}, inventory(2)), same).cuda_initialized_before


def test_verify_cuda_visibility() -> None:
    verify_cuda_visibility(DevicePlan((0, 1), {}, (), 2), 2)
    verify_cuda_visibility(DevicePlan((0, 1), {}, (), 2), 0)  # no CUDA: nothing to compare
    with pytest.raises(LaunchError) as e:
        verify_cuda_visibility(DevicePlan((0, 1), {}, (), 2), 1)
    assert "torch sees 1" in str(e.value)


def _load_fake_nvml() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("pynvml", Path(FAKE_NVML) / "pynvml.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inventory_from_nvml_maps_nvml_index_to_pci_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_GPUS", "3")
    monkeypatch.setitem(sys.modules, "pynvml", _load_fake_nvml())
    inv = query_inventory()
    assert inv.source == "nvml" and inv.count == 3 and inv.driver_version == "999.99"
    by_nvml = {g.nvml_index: g for g in inv.gpus}
    # the fake lists NVML index 0 on the highest bus: it is the last in PCI order
    assert [by_nvml[i].pci_index for i in range(3)] == [2, 1, 0]
    assert by_nvml[0].pci_bus_id == "0000:30:00.0" and by_nvml[0].uuid == "GPU-fake-0000"
    rows = gpu_table(inv, {"CUDA_VISIBLE_DEVICES": "2,0"})
    cuda = {r["nvml_index"]: r["cuda_index"] for r in rows}
    assert cuda == {0: 0, 2: 1, 1: None}  # pci 2 is nvml 0 -> cuda 0; pci 0 is nvml 2 -> cuda 1


def test_inventory_falls_back_to_procfs_then_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    monkeypatch.setitem(sys.modules, "pynvml", _load_fake_nvml())
    (tmp_path / "0000:81:00.0").mkdir()
    (tmp_path / "0000:01:00.0").mkdir()
    inv = query_inventory(tmp_path)
    assert inv.source == "procfs" and [g.pci_bus_id for g in inv.gpus] == ["0000:01:00.0", "0000:81:00.0"]
    assert "not loaded" in inv.nvml_error
    none = query_inventory(tmp_path / "absent")
    assert none.count == 0 and none.source == "none" and "not loaded" in none.describe()


def test_inventory_on_this_machine_says_why_there_is_none() -> None:
    inv = query_inventory()
    if inv.count:
        pytest.skip("this machine has GPUs")
    assert inv.nvml_error  # a reason, not silence


def test_normalise_bus_id() -> None:
    assert normalise_bus_id(b"00000000:3B:00.0") == "0000:3b:00.0"
    assert normalise_bus_id("0000:3b:00.0") == "0000:3b:00.0"
