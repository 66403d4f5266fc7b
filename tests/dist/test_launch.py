"""Real processes on gloo: torchrun, our elastic-agent spawn, a single process, two
"nodes" on one machine, --gpus reaching every worker, and failures that must be clear.

Every run happens in its own session; conftest.run fails a test that leaves a process
behind, and the worker pids each rank reports are checked to be gone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    FAKE_NVML,
    LAUNCH,
    PROBE,
    REPO,
    TORCHRUN,
    clean_env,
    free_port,
    launch,
    pid_alive,
    rank_reports,
    run,
    run_many,
)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def assert_world(reports: list[dict], world: int) -> None:
    assert [r["rank"] for r in reports] == list(range(world))
    for r in reports:
        assert r["world_size"] == world and r["all_reduce"] == world * (world + 1) / 2
        assert r["env"]["RANK"] == str(r["rank"]) and r["env"]["WORLD_SIZE"] == str(world)
        assert r["env"]["LOCAL_RANK"] == str(r["local_rank"])
        assert r["backend"] == "gloo" and r["device"] == "cpu"
        assert not pid_alive(r["pid"]), f"worker pid {r['pid']} still running"


def test_torchrun_two_ranks(tmp_path: Path) -> None:
    """torchrun as a user runs it: fresh interpreters for torchrun and both ranks (elsewhere forked)."""
    res = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            LAUNCH,
            "check",
            "--set",
            f"run.out_dir={tmp_path}",
        ],
        fresh=True,
    )
    assert res.returncode == 0, res.stderr
    reports = rank_reports(tmp_path)
    assert_world(reports, 2)
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert "world_size=2 all_reduce(rank+1)=3" in res.stderr


def test_self_launch_two_ranks_through_the_elastic_agent(tmp_path: Path) -> None:
    res = launch("check", "--nproc-per-node", "2", "--set", f"run.out_dir={tmp_path}", "--log-ranks", "all")
    assert res.returncode == 0, res.stderr
    assert_world(rank_reports(tmp_path), 2)
    assert "[rank 1] torchrun: rank 1/2" in res.stderr  # --log-ranks all shows rank 1 too
    summary = json.loads(next(tmp_path.iterdir()).joinpath("summary.json").read_text())
    assert summary["world_size"] == 2 and summary["all_reduce"] == 3.0


def test_rank0_only_logging_by_default(tmp_path: Path) -> None:
    res = launch("check", "--nproc_per_node", "2", "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    assert "[rank 0]" in res.stderr and "[rank 1]" not in res.stderr


def test_single_process_has_no_process_group(tmp_path: Path) -> None:
    res = launch("check", "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    (report,) = rank_reports(tmp_path)
    assert report["launcher"] == "single" and report["world_size"] == 1
    assert report["env"]["RANK"] is None  # nothing pretended to be torchrun


def test_two_nodes_on_one_machine_form_one_world_of_four(tmp_path: Path) -> None:
    port = free_port()
    common = [
        *TORCHRUN,
        "--nnodes",
        "2",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "twonodes",
        "--local-addr",
        "127.0.0.1",
    ]
    jobs = [
        (
            [
                *common,
                "--node-rank",
                str(node),
                LAUNCH,
                "check",
                "--set",
                f"run.out_dir={tmp_path}",
                "--set",
                "run.name=two-nodes",
            ],
            clean_env(),
        )
        for node in (0, 1)
    ]
    results = run_many(jobs)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    reports = rank_reports(tmp_path)
    assert_world(reports, 4)
    assert sorted(r["node_rank"] for r in reports) == [0, 0, 1, 1]
    assert all(r["local_world_size"] == 2 for r in reports)


def test_gpus_reach_every_worker_and_precede_the_torch_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    env = clean_env(
        PYTHONPATH=f"{FAKE_NVML}:{PROBE}",
        FAKE_NVML_GPUS="2",
        TORCH_IMPORT_PROBE=str(probe),
        CUDA_VISIBLE_DEVICES="0",
    )
    out = tmp_path / "runs"
    res = launch("check", "--nproc-per-node", "2", "--gpus", "1,0", "--set", f"run.out_dir={out}", env=env)
    assert res.returncode == 0, res.stderr
    assert "--gpus 1,0 overrides CUDA_VISIBLE_DEVICES=0" in res.stderr
    reports = rank_reports(out)
    assert len(reports) == 2
    for r in reports:
        assert r["cuda_device_order"] == "PCI_BUS_ID" and r["cuda_visible_devices"] == "1,0"
        assert r["cuda_env_applied_before_torch_import"] is True
    # the probe saw torch being imported in the launcher and in both workers, each time
    # with the variables already set
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(seen) == 3 and {r["pid"] for r in reports} < {s["pid"] for s in seen}
    assert all(s["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and s["CUDA_VISIBLE_DEVICES"] == "1,0" for s in seen)


def test_the_import_probe_can_see_a_late_setting(tmp_path: Path) -> None:
    """Control for the test above: importing torch first is visible to the probe."""
    probe = tmp_path / "probe.jsonl"
    env = clean_env(PYTHONPATH=PROBE, TORCH_IMPORT_PROBE=str(probe))
    code = "import torch, os; os.environ['CUDA_VISIBLE_DEVICES'] = '1,0'"
    assert run([sys.executable, "-c", code], env=env).returncode == 0
    (seen,) = [json.loads(line) for line in probe.read_text().splitlines()]
    assert seen["CUDA_VISIBLE_DEVICES"] is None


def test_failed_worker_is_named_and_the_launcher_fails(tmp_path: Path) -> None:
    # the fake NVML makes the launcher believe in 2 GPUs; the workers' torch sees none,
    # so forcing nccl fails inside the workers, after spawning
    env = clean_env(PYTHONPATH=FAKE_NVML, FAKE_NVML_GPUS="2")
    res = launch(
        "check",
        "--nproc-per-node",
        "2",
        "--set",
        "dist.backend=nccl",
        "--set",
        f"run.out_dir={tmp_path}",
        env=env,
    )
    assert res.returncode != 0
    assert "worker rank" in res.stderr and "failed with exit code 2" in res.stderr
    assert "dist.backend = 'nccl' needs CUDA GPUs" in res.stderr


def test_process_group_timeout_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    start = time.monotonic()
    res = launch("check", "--set", "dist.timeout_s=3", "--set", f"run.out_dir={tmp_path}", env=env)
    assert res.returncode == 2
    assert time.monotonic() - start < 60
    assert f"127.0.0.1:{port}" in res.stderr and "dist.timeout_s=3s" in res.stderr
    assert "Traceback" not in res.stderr


def test_collectives_on_a_real_gloo_group() -> None:
    res = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "dist" / "collectives_worker.py"),
        ],
        env=clean_env(PYTHONPATH=str(REPO)),
    )
    assert res.returncode == 0, res.stderr
    assert "collectives ok rank 0/2" in res.stdout and "collectives ok rank 1/2" in res.stdout


def test_collectives_are_the_identity_alone() -> None:
    res = run(
        [sys.executable, str(REPO / "tests" / "dist" / "collectives_worker.py")],
        env=clean_env(PYTHONPATH=str(REPO)),
    )
    assert res.returncode == 0, res.stderr
    assert "collectives ok rank 0/1" in res.stdout


# ----------------------------------------------------------------- bad input, no worker


def _no_workers(res: subprocess.CompletedProcess[str], out: Path) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "starting" not in res.stderr and not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "no/such.toml"], "config file 'no/such.toml' does not exist"),
        (["--set", "dist.tiemout_s=3"], "did you mean 'timeout_s'"),
        (["--set", "run.seed=abc"], "run.seed: expected an integer, got 'abc'"),
        (["--gpus", "0,x"], "'x' is not a GPU id"),
        (["--gpus", "-1"], "negative"),
        (["--gpus", "1,1"], "listed twice"),
        (["--gpus", "0"], "GPU id 0 does not exist"),  # this machine has no GPU
        (["--set", "dist.backend=nccl"], "needs CUDA GPUs"),
    ],
)
def test_bad_input_exits_2_before_any_worker(args: list[str], needle: str, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = launch("check", "--nproc-per-node", "2", "--set", f"run.out_dir={out}", *args)
    _no_workers(res, out)
    assert needle in res.stderr


@pytest.mark.parametrize(
    "nproc, gpus, needle",
    [
        ("2", "0,2", "GPU id 2 does not exist; only 2 GPU(s) are present (ids 0-1)"),
        ("3", "0,1", "only 2 GPU(s) are visible"),
    ],
)
def test_bad_gpu_requests_with_fake_gpus(nproc: str, gpus: str, needle: str, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    env = clean_env(PYTHONPATH=FAKE_NVML, FAKE_NVML_GPUS="2")
    res = launch("check", "--nproc-per-node", nproc, "--gpus", gpus, "--set", f"run.out_dir={out}", env=env)
    _no_workers(res, out)
    assert needle in res.stderr


def test_master_port_in_use(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = launch(
            "check", "--nproc-per-node", "2", "--master-port", str(port), "--set", f"run.out_dir={out}"
        )
    _no_workers(res, out)
    assert f"--master-port {port} is already in use" in res.stderr


def test_unwritable_run_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = launch("check", "--set", f"run.out_dir={blocker}")
    assert res.returncode == 2 and "cannot write the run directory" in res.stderr
    assert blocker.read_text() == "not a folder"


def test_env_command_without_gpu(tmp_path: Path) -> None:
    res = launch("env", "--json", fresh=True)  # the import order is the subject: a fresh interpreter
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["gpu_count"] == 0 and info["nvml"]["available"] is False
    assert info["nvml"]["error"]
    assert info["cuda_env"]["applied_before_torch_import"] is True
    assert info["cuda_env"]["cuda_initialized_in_this_process"] is False
    assert info["cpu_count"] >= 1 and "total_mib" in info["dev_shm"]
    text = launch("env")
    assert "NVML          not available" in text.stdout and "GPUs          none" in text.stdout


def test_env_command_with_fake_gpus_maps_indices() -> None:
    env = clean_env(PYTHONPATH=FAKE_NVML, FAKE_NVML_GPUS="2")
    res = launch("env", "--json", "--gpus", "1", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["gpu_count"] == 2 and info["nvml"]["available"]
    rows = {r["pci_index"]: r for r in info["gpus"]}
    assert rows[1]["cuda_index"] == 0 and rows[0]["cuda_index"] is None
    assert rows[1]["nvml_index"] == 0  # the fake's NVML 0 sits on the higher bus
    assert info["env"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_bench_launch_writes_a_same_run_comparison(tmp_path: Path) -> None:
    # one rank a side: the comparison's shape is the subject (start-up of 2 ranks: test_torchrun_two_ranks)
    res = launch(
        "bench",
        "launch",
        "--repeats",
        "1",
        "--nproc",
        "1",
        "--warmup",
        "0",
        "--set",
        f"run.out_dir={tmp_path}",
        "--set",
        "run.name=b",
        timeout=170,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    names = [r["variant"] for r in data["summary"]]
    assert names == ["torchrun_minimal", "launch_py"]
    assert data["summary"][0]["ratio_vs_torchrun_minimal"] == 1.0
    assert data["summary"][1]["median_s"] > 0
    assert (tmp_path / "b" / "bench.csv").read_text().count("\n") == 3  # header + 2 runs
    assert "median ratio" in res.stdout


def test_slurm_tasks_form_one_world(tmp_path: Path) -> None:
    """Two processes started the way srun starts them: only SLURM_* variables."""
    port = free_port()
    cmd = [
        sys.executable,
        LAUNCH,
        "check",
        "--set",
        f"run.out_dir={tmp_path}",
        "--set",
        "run.name=slurm",
        "--set",
        "dist.timeout_s=60",
    ]
    jobs = [
        (
            cmd,
            clean_env(
                SLURM_PROCID=str(task),
                SLURM_LOCALID=str(task),
                SLURM_NODEID="0",
                SLURM_NTASKS="2",
                SLURM_TASKS_PER_NODE="2",
                SLURM_JOB_ID="42",
                SLURM_JOB_NODELIST="127.0.0.1",
                MASTER_PORT=str(port),
            ),
        )
        for task in (0, 1)
    ]
    results = run_many(jobs, timeout=120)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    reports = rank_reports(tmp_path)
    seen = [(r["rank"], r["launcher"], r["all_reduce"]) for r in reports]
    assert seen == [(0, "slurm", 3.0), (1, "slurm", 3.0)]


def test_static_master_port_spawn(tmp_path: Path) -> None:
    port = free_port()
    res = launch(
        "check",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "--set",
        f"run.out_dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr
    assert_world(rank_reports(tmp_path), 2)
    assert "--rdzv-backend static" in res.stderr


def test_bench_overhead_smoke(tmp_path: Path) -> None:
    res = launch(
        "bench",
        "overhead",
        "--repeats",
        "2",
        "--steps",
        "8",
        "--batch",
        "4",
        "--size",
        "16",
        "--set",
        f"run.out_dir={tmp_path}",
        "--set",
        "run.name=o",
        timeout=170,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert [r["variant"] for r in data["summary"]] == ["bare_ddp", "launch_py"]
    # 2 rounds of 8 pairs, less the 5 warm-up pairs of the first round and the first of the second;
    # the engine-vs-bare pairs are the steps without the monitor (steps 0 and 3 of every 4): 4 of 10
    meta = data["meta"]
    assert all(r["median_step_s"] > 0 and r["steps"] == 10 for r in data["summary"])
    low, high = meta["overhead_ci95"]
    assert low <= meta["overhead"] <= high and meta["pairs"] == 4 and meta["monitor_pairs"] == 4
    assert meta["monitor_in_step_us"] > 0 and 0 < meta["monitor_overhead_direct"] < 1
    assert meta["ledger_count_us"] > 0 and meta["ledger_check_ms"] > 0 and 0 < meta["ledger_share"] < 1
    assert "per-step overhead" in res.stdout and "95% CI" in res.stdout
    assert "the sample ledger: " in res.stdout
    assert meta["timing_clock_us"] > 0 and meta["timing_window_ms"] > 0 and 0 < meta["timing_share"] < 1
    assert "the step breakdown: " in res.stdout


def test_bench_parallel_reports_every_mode(tmp_path: Path) -> None:
    """single and ddp and fsdp run for real on gloo; dp says why not; the losses agree with single."""
    small = ("--steps", "4", "--warmup", "2", "--image-size", "16", "--batch-per-gpu", "4")
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=p")
    res = launch("bench", "parallel", "--modes", "single,dp,ddp,fsdp", "--nproc-per-node", "2", *small, *sets,
                 timeout=170)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "p"
    data = json.loads((out / "bench.json").read_text())
    modes = data["modes"]
    assert set(modes) == {"single", "dp", "ddp", "fsdp"}
    assert (
        not modes["dp"]["available"]
        and "DataParallel" in modes["dp"]["reason"]
        and "CPU" in modes["dp"]["reason"]
    )
    for m in ("single", "ddp", "fsdp"):
        r = modes[m]
        assert r["median_step_s"] > 0 and r["images_per_s"] > 0 and r["global_batch"] == 8, m
        assert r["loss_ok"] and len(r["losses"]) == 5, m  # the first 5 steps, warm-up included
        assert len(r["peak_mem_per_device_mib"]) == r["devices"] and min(r["peak_mem_per_device_mib"]) > 0
    assert modes["ddp"]["loss_max_rel_diff"] < 1e-4 and 0 <= modes["ddp"]["comm_share"] < 1
    assert modes["single"]["vs_hand_loop"] > 0
    for f in ("bench.csv", "bench.md", "bench.png"):
        assert (out / f).stat().st_size > 0, f
    assert "dp: not available here" in res.stdout


def test_bench_parallel_on_a_configs_own_data(demo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[data]\ncsv = "{demo / "src" / "labels.csv"}"\nimages = "{demo / "src" / "images"}"\n'
        f'cache_dir = "{demo / "cache"}"\nstats_cache = "{demo / "stats"}"\nnum_workers = 0\n'
        "[model]\nwidth = 8\nbatchnorm = false\n"
    )
    small = ("--steps", "3", "--warmup", "1", "--batch-per-gpu", "4")
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=p")
    res = launch("bench", "parallel", "--config", str(cfg), "--modes", "single,ddp", "--nproc-per-node", "2",
                 *small, *sets, timeout=170)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    modes = json.loads((tmp_path / "p" / "bench.json").read_text())["modes"]
    assert modes["ddp"]["loss_ok"] and modes["ddp"]["loss_max_rel_diff"] < 1e-4  # the same global batches
    assert modes["single"]["data_wait_share"] > 0 and "vs_hand_loop" not in modes["single"]
