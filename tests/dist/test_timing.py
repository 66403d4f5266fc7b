"""Where each rank's time goes: the breakdown on every rank, and a straggler named with its cause.

Real slowdowns on real processes: 2 gloo ranks each pinned to its own core, and a busy process
sharing rank 1's core (the CPU cause); rank 1 decoding through a slow path (the data cause).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, clean_env, launch, ranks_of, start_launch, tiny

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]
SETS = ("train.epochs=8", "timing.window=5", "memory.enabled=false")
# steps of ~20 ms of compute (the tiny model's 3 ms drown in scheduling noise on a loaded host)
BUSY = (*SETS, "train.epochs=10", "model.width=32", "train.log_every=20")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def pin(proc: psutil.Process, core: int) -> None:
    """Every thread of ``proc`` on ``core`` (taskset -a)."""
    for tid in os.listdir(f"/proc/{proc.pid}/task"):
        os.sched_setaffinity(int(tid), {core})


@pytest.mark.serial  # another test's processes would move to rank 0's core: both ranks shared alike
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_rank_sharing_its_core_with_a_busy_process_is_named_with_the_cpu_cause(
    demo: Path, tmp_path: Path
) -> None:
    job = start_launch(["train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "b", *BUSY)], clean_env(),
                       fork_ranks=False)  # fmt: skip
    busy = None
    try:
        deadline = time.monotonic() + 60
        while len(ranks := ranks_of(job)) < 2 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert len(ranks) == 2, "no two ranks to pin"
        for local, proc in ranks.items():
            pin(proc, int(local))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(busy.pid, {1})
        out, _ = job.communicate(timeout=200)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    lines = [x for x in out.splitlines() if "is a straggler" in x]
    assert lines and lines[0].startswith("[rank 0] WARNING: rank 1 (node "), out[-3000:]
    assert "its cores are shared with another process" in lines[0] and "the others wait" in lines[0], lines[0]
    episodes = summary(tmp_path / "b")["timing"]["stragglers"]
    assert episodes and {e["rank"] for e in episodes} == {1}, episodes
    print(lines[0])


def test_a_rank_decoding_slowly_is_named_with_the_data_cause_and_every_step_is_broken_down(
    demo: Path, tmp_path: Path
) -> None:
    env = clean_env(PYTHONPATH=str(REPO / "tests" / "fakes" / "slowdecode"), SLOW_DECODE_RANK="1",
                    SLOW_DECODE_S="0.006")  # fmt: skip
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "d", *SETS), env=env, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if "is a straggler" in x]
    assert lines and "rank 1 (node " in lines[0] and "data wait" in lines[0], res.stderr[-3000:]
    assert "its loader is starved" in lines[0], lines[0]
    timing = summary(tmp_path / "d")["timing"]
    steps = summary(tmp_path / "d")["global_step"]
    medians = timing["median_s_per_rank"]
    assert timing["straggler_check"].endswith("episode(s)") and "not judged" not in timing["straggler_check"]
    assert [m["rank"] for m in medians] == [0, 1] and all(m["steps"] == steps for m in medians)
    assert medians[1]["data"] > 8 * 0.006 * 0.9 > medians[0]["data"]  # 8 images a step, 6 ms each
    for rank in (0, 1):
        rows = (tmp_path / "d" / f"timing_rank{rank}.csv").read_text().splitlines()
        assert rows[0] == "step,wall,data,compute,comm,optimizer,rest,cpu,queue" and len(rows) == steps + 1
        for row in rows[1:]:
            step, wall, *phases, _cpu, _queue = (float(v) for v in row.split(","))
            assert min(phases) >= 0 and sum(phases) == pytest.approx(wall, rel=1e-3, abs=1e-5), row
