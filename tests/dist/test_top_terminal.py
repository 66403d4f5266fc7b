"""``launch.py top`` in a real terminal (tmux) beside a real 2-rank job, and its snapshot without one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env, start_launch, tiny

pytestmark = [pytest.mark.dist, pytest.mark.timeout(200)]


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rank_rows(pane: str) -> dict[int, list[str]]:
    """The table's rows by rank: rank, node, device, step, ..."""
    rows = {}
    for line in pane.splitlines():
        cells = line.split()
        if len(cells) > 4 and cells[0].isdigit() and cells[3].isdigit():
            rows[int(cells[0])] = cells
    return rows


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_in_a_terminal_follows_both_ranks_and_quits_on_q(demo: Path, tmp_path: Path) -> None:
    sets = ("train.epochs=200", "timing.window=5", "train.log_every=50", "checkpoint.every_epoch=false")
    job = start_launch(["train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "t", *sets)], clean_env())
    run_dir = tmp_path / "t"
    output: list[str] = []  # drained as it comes: a full pipe would stall the job
    threading.Thread(target=lambda: output.append(job.stdout.read()), daemon=True).start()
    tmux = ["tmux", "-L", f"top-test-{os.getpid()}"]
    env = clean_env(PYTHONPATH=str(REPO))
    try:
        wait_for(
            lambda: all((run_dir / f"live_rank{r}.json").exists() for r in (0, 1)), 90, "both live files"
        )
        cmd = f"{sys.executable} {REPO / 'launch.py'} top {run_dir}"
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "30", cmd], env=env,
                       check=True)  # fmt: skip
        panes = []
        for _ in range(2):
            time.sleep(2.5)  # top redraws every second; the job advances meanwhile
            panes.append(subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], env=env,
                                        capture_output=True, text=True, check=True).stdout)  # fmt: skip
        first, second = (rank_rows(p) for p in panes)
        assert set(first) == {0, 1} and set(second) == {0, 1}, panes
        assert int(second[0][3]) > int(first[0][3]), panes  # the step moved on between the captures
        assert "running | step " in panes[1] and "(q quits)" in panes[1], panes[1]
        print(panes[1])  # what the terminal showed (pytest -s)
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], env=env, check=True)
        gone = lambda: subprocess.run([*tmux, "has-session", "-t", "top"], env=env,  # noqa: E731
                                      capture_output=True).returncode != 0  # fmt: skip
        wait_for(gone, 5, "top to quit on q")
        # without a terminal: one snapshot, then the job stopped (SIGTERM) and said so
        snap = subprocess.run([sys.executable, str(REPO / "launch.py"), "top", str(run_dir)], env=env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert snap.returncode == 0 and set(rank_rows(snap.stdout)) == {0, 1}, snap.stdout + snap.stderr
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 128 + signal.SIGTERM, output
        end = subprocess.run([sys.executable, str(REPO / "launch.py"), "top", "--once", str(run_dir)],
                             env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert end.stdout.splitlines()[1].startswith("stopped | step "), end.stdout
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
        if job.poll() is None:
            job.kill()
            job.wait()
