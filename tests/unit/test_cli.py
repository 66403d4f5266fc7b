"""launch.py's argument handling and its pre-spawn checks (no worker started)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

import launch
from distrib import cli
from distrib.config import load_config
from distrib.devices import DevicePlan, GpuInfo, Inventory
from distrib.errors import LaunchError
from distrib.spawn import SpawnPlan, check_plan, strip_launcher_flags, torchrun_argv


def test_default_command_is_train() -> None:
    assert cli.normalise_argv([]) == ["train"]
    assert cli.normalise_argv(["--nproc-per-node", "2"]) == ["train", "--nproc-per-node", "2"]
    assert cli.normalise_argv(["env", "--json"]) == ["env", "--json"]


def test_unknown_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "did you mean 'train'" in err and "bench" in err


@pytest.mark.parametrize("spelling", ["--nproc-per-node", "--nproc_per_node"])
def test_torchrun_spellings_both_work(spelling: str) -> None:
    args = cli.build_parser().parse_args(
        ["train", spelling, "2", "--master_port", "1234", "--node-rank", "1", "--log_ranks", "all"]
    )
    assert (args.nproc_per_node, args.master_port, args.node_rank, args.log_ranks) == ("2", 1234, 1, "all")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--nproc-per-node", "0"], "positive integer"),
        (["train", "--nproc-per-node", "many"], "'many'"),
        (["train", "--master-port", "70000"], "1-65535"),
        (["train", "--nnodes", "0"], "N or MIN:MAX"),
    ],
)
def test_bad_launcher_flags(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_strip_launcher_flags_keeps_the_rest() -> None:
    argv = [
        "train",
        "--nproc-per-node",
        "2",
        "--gpus",
        "1,0",
        "--master_port=99",
        "--set",
        "run.seed=1",
        "--rdzv-endpoint",
        "h:1",
        "--nnodes=1",
    ]
    assert strip_launcher_flags(argv) == ["train", "--gpus", "1,0", "--set", "run.seed=1"]


def test_torchrun_argv_standalone_static_and_c10d() -> None:
    single = torchrun_argv(SpawnPlan(2), "s.py", ["train"])
    # --standalone's job with a rendezvous port of our own (a restarted round needs one that lasts)
    assert single[single.index("--rdzv-backend") + 1] == "c10d" and single[-2:] == ["s.py", "train"]
    host, port = single[single.index("--rdzv-endpoint") + 1].split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536 and "--standalone" not in single
    assert single[single.index("--max-restarts") + 1] == "0"  # not LaunchConfig's 3
    static = torchrun_argv(SpawnPlan(2, master_port=1234, node_rank=1), "s.py", [])
    assert static[static.index("--rdzv-backend") + 1] == "static"
    assert static[static.index("--master-port") + 1] == "1234"
    assert static[static.index("--node-rank") + 1] == "1"
    c10d = torchrun_argv(SpawnPlan(4, nnodes="2", rdzv_endpoint="h:29400", rdzv_id="j"), "s.py", [])
    assert c10d[c10d.index("--rdzv-backend") + 1] == "c10d" and "--standalone" not in c10d
    with pytest.raises(LaunchError) as e:
        torchrun_argv(SpawnPlan(2, nnodes="2"), "s.py", [])
    assert "--rdzv-endpoint" in str(e.value)


def test_master_port_in_use_is_caught_before_spawning() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LaunchError) as e:
            check_plan(SpawnPlan(2, master_port=port))
    assert f"--master-port {port} is already in use" in str(e.value)


def _args(nproc: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["train", "--nproc-per-node", nproc])


def _inv(n: int) -> Inventory:
    return Inventory(tuple(GpuInfo(i, i, f"0000:0{i}:00.0") for i in range(n)), "nvml")


def test_spawn_plan_refuses_more_processes_than_gpus_on_nccl() -> None:
    cfg = load_config(None)
    with pytest.raises(LaunchError) as e:
        launch.spawn_plan(_args("4"), cfg, DevicePlan((0, 1), {}, (), 2), _inv(2))
    assert "--nproc-per-node 4" in str(e.value) and "--gpus 0,1" in str(e.value)
    gloo = load_config(None, ["dist.backend=gloo"])
    assert launch.spawn_plan(_args("4"), gloo, DevicePlan((0, 1), {}, (), 2), _inv(2)).nproc_per_node == 4


def test_spawn_plan_resolves_gpu_and_auto() -> None:
    cfg = load_config(None)
    assert launch.spawn_plan(_args("gpu"), cfg, DevicePlan((), {}, (), 3), _inv(3)).nproc_per_node == 3
    assert launch.spawn_plan(_args("auto"), cfg, DevicePlan((), {}, (), 3), _inv(3)).nproc_per_node == 3
    with pytest.raises(LaunchError) as e:
        launch.spawn_plan(_args("gpu"), cfg, DevicePlan((), {}, (), 0), _inv(0))
    assert "no GPU is visible" in str(e.value)


def test_nccl_without_cuda_is_refused_before_spawning() -> None:
    cfg = load_config(None, ["dist.backend=nccl"])
    with pytest.raises(LaunchError) as e:
        launch.spawn_plan(_args("2"), cfg, DevicePlan((), {}, (), 0), _inv(0))
    assert "nccl" in str(e.value)


def test_config_command_prints_resolved_typed_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["config", "--set", "dist.timeout_s=5", "--gpus", "1,0"]) == 0
    out = capsys.readouterr().out
    assert "timeout_s = 5.0" in out and "gpus = [1, 0]" in out


def test_flags_win_over_set() -> None:
    args = cli.build_parser().parse_args(["config", "--set", "launch.gpus=[3]", "--gpus", "0"])
    assert cli.flag_overrides(args) == ["launch.gpus=[0]"]


def test_the_torchlaunch_command_works_from_any_folder_with_the_default_config(tmp_path: Path) -> None:
    """`pip install` gives a `torchlaunch` command (= python launch.py); from another folder it still
    reads configs/default.toml."""
    exe = Path(sys.executable).with_name("torchlaunch")
    if not exe.exists():
        pytest.skip("the project is not installed in this interpreter's environment (pip install -e .)")
    res = subprocess.run([str(exe), "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "synthetic = 200" in res.stdout and "width = 16" in res.stdout  # default.toml's, not the code's


def test_a_wheel_holds_every_module_and_the_configs(tmp_path: Path) -> None:
    """A plain (not editable) install has every sub-package and the configs."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-w", str(tmp_path)]
    res = subprocess.run([*cmd, str(REPO)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"pip wheel cannot build here: {res.stderr[-300:]}")
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        str(p.relative_to(REPO)) for top in ("distrib", "datasets") for p in (REPO / top).rglob("*.py")
    }
    assert modules and not modules - names, sorted(modules - names)
    assert any(n.endswith("share/torchlaunch/configs/default.toml") for n in names)
    assert "launch.py" in names


def test_run_and_memcheck_help_show_the_script_and_dash_m() -> None:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("run", "memcheck"):
        text = sub.choices[command].format_help()
        assert "SCRIPT.py" in text and "-m MODULE" in text, text


def test_meeting_points_are_checked_before_any_worker() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--rdzv-endpoint", "nohost"])  # no port: argparse's line
    assert cli.build_parser().parse_args(["train", "--rdzv-endpoint", "127.0.0.1:29400"]).rdzv_endpoint
    with pytest.raises(LaunchError, match=r"--master-addr 999.1.1.1: this host name or address cannot be"):
        check_plan(SpawnPlan(1, "2", 0, "999.1.1.1", 29500))
    with pytest.raises(LaunchError, match=r"--rdzv-endpoint no-such-host.invalid: .*cannot be resolved"):
        check_plan(SpawnPlan(1, "2", 0, None, None, "no-such-host.invalid:29400"))
    check_plan(SpawnPlan(1, "2", 0, None, None, "127.0.0.1:29400"))


def test_launcher_flags_without_nproc_per_node_are_named() -> None:
    args = cli.build_parser().parse_args(["train", "--rdzv-endpoint", "h:1", "--max-restarts", "2"])
    assert launch.launcher_flags_given(args) == ["--rdzv-endpoint", "--max-restarts"]
    assert launch.launcher_flags_given(cli.build_parser().parse_args(["train"])) == []
