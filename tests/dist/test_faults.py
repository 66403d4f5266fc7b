"""Faults on real processes (CPU, gloo): a killed worker restarts and resumes exactly; a killed
launcher leaves no rank behind."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import LAUNCH, REPO, TORCHRUN, clean_env, free_port, launch, tiny, weights

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
SETS = ("train.epochs=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3")


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "steps.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def ranks_of(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """The job's worker processes by LOCAL_RANK (the launcher's or torchrun's children)."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "LOCAL_RANK" in env and "launch.py" in " ".join(child.cmdline()):
            found[env["LOCAL_RANK"]] = child
    return found


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 200) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def kill_a_rank_at(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while steps_logged(run_dir) < step and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    victims = ranks_of(proc)
    assert "1" in victims, f"no rank 1 to kill at step {step}"
    victims["1"].kill()


def same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[r[:5] for r in csv.reader((d / "metrics.csv").open())] for d in (a, b)]
    assert rows[0] == rows[1]
    steps = [[(r["step"], r["loss"]) for r in csv.DictReader((d / "steps.csv").open())] for d in (a, b)]
    assert steps[0] == steps[1]  # no duplicate rows after the resume, the same losses


@pytest.fixture(scope="module")
def reference(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, out, "ref", *SETS), timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "ref"


def test_a_killed_worker_restarts_and_resumes_exactly_under_our_launcher(
    demo: Path, reference: Path, tmp_path: Path
) -> None:
    step = random.Random().randint(6, 24)
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "2", "--max-restarts", "1",
                  *tiny(demo, tmp_path, "k", *SETS)])  # fmt: skip
    kill_a_rank_at(proc, tmp_path / "k", step)
    out = finish(proc)
    assert proc.returncode == 0, f"killed at step {step}\n{out[-3000:]}"
    assert "restart 1: resuming from the newest valid checkpoint" in out and "resumed from" in out
    same_run(reference, tmp_path / "k")


def test_a_killed_worker_restarts_and_resumes_exactly_under_torchrun(
    demo: Path, reference: Path, tmp_path: Path
) -> None:
    step = random.Random().randint(6, 24)
    endpoint = f"127.0.0.1:{free_port()}"
    agent = ["--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d"]
    proc = start(
        [*TORCHRUN, *agent, "--rdzv-endpoint", endpoint, LAUNCH, "train", *tiny(demo, tmp_path, "t", *SETS)]
    )
    kill_a_rank_at(proc, tmp_path / "t", step)
    out = finish(proc)
    assert proc.returncode == 0, f"killed at step {step}\n{out[-3000:]}"
    same_run(reference, tmp_path / "t")


def test_a_killed_launcher_leaves_no_rank_training(demo: Path, tmp_path: Path) -> None:
    proc = start([sys.executable, LAUNCH, "train", "--nproc-per-node", "2",
                  *tiny(demo, tmp_path, "o", "train.epochs=200")])  # fmt: skip
    deadline = time.monotonic() + 60
    while steps_logged(tmp_path / "o") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = list(ranks_of(proc).values())
    assert len(ranks) == 2
    proc.kill()  # SIGKILL: the launcher (the agent) cannot forward anything
    proc.wait()
    gone = psutil.wait_procs(ranks, timeout=15)[1]
    for p in gone:
        p.kill()
    assert gone == [], f"ranks still running after the launcher died: {gone}"
    finish(proc, 5)
