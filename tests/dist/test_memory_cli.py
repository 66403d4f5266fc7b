"""The memory monitor through the real CLI: train, memcheck and run, on 1 and 2 gloo ranks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env, launch, tiny

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
SCRIPTS = REPO / "tests" / "fakes" / "scripts"
LEAKY = str(REPO / "tests" / "fakes" / "leaky")
SLOWSTART = REPO / "tests" / "fakes" / "slowstart"
USER = str(SCRIPTS / "user_train.py")


def memcheck_script(tmp_path: Path, leak: str, steps: int, *extra: str):
    env = clean_env(LEAK=leak)
    return launch("memcheck", *extra, "--set", f"run.out_dir={tmp_path}", "--set", "run.name=m", "--", USER,
                  str(steps), env=env, timeout=240)  # fmt: skip


def reports(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("memory_rank*.json"))]


@pytest.mark.parametrize("nproc", [[], ["--nproc-per-node", "2"]], ids=["1-rank", "2-ranks"])
def test_memcheck_finds_outputs_kept_with_their_graph_in_a_users_script(
    nproc: list[str], tmp_path: Path
) -> None:
    res = memcheck_script(tmp_path, "graph", 1000, *nproc)
    assert res.returncode == 3, res.stderr[-3000:]
    reps = reports(tmp_path / "m")
    assert len(reps) == (2 if nproc else 1) and all(r["leak"] for r in reps)
    assert all(r["steps"] <= 300 for r in reps)  # found (and stopped) within 300 steps
    assert all(r["verdict"]["cause"] == "tensors" for r in reps)
    assert "tensors [64, 100] float32 with grad_fn AddmmBackward0" in res.stdout
    assert "outputs kept with their autograd graph" in res.stdout and "| YES |" in res.stdout
    assert (tmp_path / "m" / "memory.png").stat().st_size > 1000


@pytest.mark.parametrize("nproc", [[], ["--nproc-per-node", "2"]], ids=["1-rank", "2-ranks"])
def test_memcheck_passes_the_same_script_without_the_leak(nproc: list[str], tmp_path: Path) -> None:
    res = memcheck_script(tmp_path, "none", 500, *nproc)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert all(not r["leak"] and r["steps"] == 500 for r in reports(tmp_path / "m"))


def test_one_buffer_allocated_mid_run_is_not_a_leak(tmp_path: Path) -> None:
    res = memcheck_script(tmp_path, "once", 500)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    (r,) = reports(tmp_path / "m")
    rows = (tmp_path / "m" / "memory_rank0.csv").read_text().splitlines()
    first, last = (int(row.split(",")[5]) for row in (rows[1], rows[-1]))  # the "host" column
    assert last - first > 12 * 2**20 and not r["leak"]  # the 16 MiB buffer is there, and judged flat


def test_memcheck_finds_host_memory_outside_torch(tmp_path: Path) -> None:
    res = memcheck_script(tmp_path, "numpy", 1000)
    assert res.returncode == 3, res.stderr[-3000:]
    (r,) = reports(tmp_path / "m")
    assert r["verdict"]["cause"] == "outside_torch" and "numpy arrays [4096] float64" in res.stdout


@pytest.mark.parametrize("nproc", [[], ["--nproc-per-node", "2"]], ids=["1-rank", "2-ranks"])
def test_train_finds_a_model_that_keeps_its_outputs(nproc: list[str], demo: Path, tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=LEAKY)
    extra = (
        "model.name=leaky_models:LeakyCNN",
        "train.epochs=100",
        "train.max_steps=300",
        "train.log_every=100",
    )
    sets = tiny(demo, tmp_path, "t", *extra, "checkpoint.every_epoch=false")
    res = launch("train", *nproc, *sets, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())["memory"]
    assert summary["leak_ranks"] == ([0, 1] if nproc else [0])
    assert "memory is leaking on rank 0" in res.stderr and "MaxPool2DWithIndicesBackward0" in res.stderr
    assert all(r["verdict"]["cause"] == "tensors" for r in reports(tmp_path / "t"))


def test_memcheck_of_our_job_fails_a_leaky_model_and_passes_a_quiet_one(demo: Path, tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=LEAKY)
    results = {}
    for model, steps in (("LeakyCNN", "500"), ("QuietCNN", "300")):  # the leak stops it early
        sets = tiny(demo, tmp_path, model, f"model.name=leaky_models:{model}")
        results[model] = launch(
            "memcheck", "--nproc-per-node", "2", "--steps", steps, *sets, env=env, timeout=280
        )
    leaky, quiet = results["LeakyCNN"], results["QuietCNN"]
    assert leaky.returncode == 3 and "the memory detector found a leak" in leaky.stderr, leaky.stderr[-3000:]
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr[-3000:]
    assert all(not r["leak"] and r["judged"] and r["steps"] == 300 for r in reports(tmp_path / "QuietCNN"))


def test_run_passes_arguments_and_exit_codes_through(tmp_path: Path) -> None:
    sets = ("--set", f"run.out_dir={tmp_path}")
    res = launch("run", *sets, str(SCRIPTS / "echo_args.py"), "--lr", "0.1", "--nproc-per-node", "5", "a b")
    assert res.returncode == 0 and 'ARGV ["--lr", "0.1", "--nproc-per-node", "5", "a b"]' in res.stdout
    assert "NAME __main__" in res.stdout
    res = launch("run", "--nproc-per-node", "2", *sets, str(SCRIPTS / "echo_args.py"), "--gpus", "9",
                 env=clean_env(EXIT_CODE="7"))  # fmt: skip
    assert res.returncode == 7 and res.stdout.count('ARGV ["--gpus", "9"]') == 2


@pytest.mark.parametrize("rank0", ["on time", "late"])
def test_run_names_a_failing_rank_like_train(tmp_path: Path, rank0: str) -> None:
    """Rank 1's script raises. ``late``: rank 0 reaches its script only after the agent has
    SIGTERMed it for that (a rank slow to import torch on a busy host: once in a CI run, rank 0
    then died at once and wrote no summary): it must not start the script, and must still write
    the summary, which names rank 1's failure, not its own SIGTERM."""
    script = str(SCRIPTS / "echo_args.py")
    late = {"PYTHONPATH": str(SLOWSTART), "SLOW_START_RANK": "0"} if rank0 == "late" else {}
    res = launch(
        "run",
        "--nproc-per-node",
        "2",
        "--set",
        f"run.out_dir={tmp_path}",
        script,
        env=clean_env(FAIL_RANK="1", **late),
    )
    assert res.returncode == 1
    assert "worker rank 1" in res.stderr and "ValueError: bad value in the user's script" in res.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # what was measured is still written
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["exit_from"] == "script"
    assert (run_dir / "memory_rank1.json").exists() and (run_dir / "memory_rank0.json").exists()
    assert "exit 1: the script's own exit code" in res.stdout
    if late:
        assert summary["exit_per_rank"]["0"] == {"code": 143, "from": "sigterm"}
        assert "RANK 0" not in res.stdout and "the script was not started: SIGTERM came first" in res.stderr


def test_run_a_module_with_dash_m(tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=str(SCRIPTS))
    res = launch("run", "--set", f"run.out_dir={tmp_path}", "-m", "echo_args", "--x", "1", env=env)
    assert res.returncode == 0 and 'ARGV ["--x", "1"]' in res.stdout


def test_without_nvml_every_command_says_so_once(demo: Path, tmp_path: Path) -> None:
    env = clean_env(LEAK="none")
    said = "not monitored here: GPU memory (torch allocator, NVML): this rank runs on the CPU"
    train = launch("train", *tiny(demo, tmp_path, "n", "train.epochs=1"), env=env)
    run = launch("run", "--set", f"run.out_dir={tmp_path}", USER, "30", env=env)
    mem = launch("memcheck", "--set", f"run.out_dir={tmp_path}", "--", USER, "30", env=env)
    for res in (train, run, mem):
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stderr.count(said) == 1
    assert "GPU: not monitored" in launch("env").stdout


def test_a_scripts_own_exit_3_is_not_called_a_leak_and_no_rank_waits_unannounced(tmp_path: Path) -> None:
    """Exit 3 is the leak status only when the detector found one; rank 0, whose script failed while
    rank 1 waits in a barrier, does not wait 30 s for rank 1's memory report."""
    sets = ("--set", f"run.out_dir={tmp_path}", "--set", "run.name=own")
    start = time.monotonic()
    res = launch("run", "--nproc-per-node", "2", *sets, str(SCRIPTS / "echo_args.py"),
                 env=clean_env(EXIT_CODE="3", BLOCK_OTHERS="1"))  # fmt: skip
    took = time.monotonic() - start
    assert res.returncode == 3, res.stderr[-3000:]
    assert "found a leak" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert "3 is the script's own exit code: the memory detector found no leak" in res.stderr, res.stderr
    assert "exit 3: the script's own exit code (the memory detector found no leak)" in res.stdout
    assert took < 25, f"{took:.0f} s: rank 0 waited for a report that could not come"
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert summary["exit_code"] == 3 and summary["exit_from"] == "script" and summary["leak"] is False
