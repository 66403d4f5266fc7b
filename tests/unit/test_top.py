"""``launch.py top``'s reading and drawing, on live files as train writes them (the live terminal
itself: tests/dist/test_top.py, in tmux)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from distrib.errors import LaunchError
from distrib.top import main_top, newest_run, read_ranks, render

PHASES = {"wall": 55.0, "data": 8.0, "compute": 15.0, "comm": 28.0, "optimizer": 0.6, "rest": 0.4}


def status(rank: int, world: int = 2, **changes: object) -> dict:
    base = {
        "rank": rank, "world_size": world, "node": "vm", "device": "cpu", "pid": 100 + rank,
        "time": time.time(), "state": "running", "step": 340, "total_steps": 1200, "epoch": 1, "epochs": 10,
        "images_per_s": 600.0, "eta_s": 192.0, "phases_ms": PHASES,
        "memory_mb": {"rss": 812.0, "alloc": None}, "trend_mb_per_100_steps": 0.1, "leak": None,
        "straggler": None,
    }  # fmt: skip
    return base | changes


def write(folder: Path, *ranks: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in ranks:
        (folder / f"live_rank{r['rank']}.json").write_text(json.dumps(r))
    return folder


def rank_line(text: str, rank: int) -> str:
    return next(line for line in text.splitlines() if line.split()[:1] == [str(rank)])


def test_the_view_shows_every_rank_the_job_and_each_flag_in_words(tmp_path: Path) -> None:
    slow = "rank 1 (node vm, cpu) is a straggler: forward/backward 2.23x the others' median"
    folder = write(tmp_path / "r", status(0), status(1, step=338, images_per_s=590.5, straggler=slow,
                                                     phases_ms=PHASES | {"compute": 31.4}))  # fmt: skip
    text = render(folder, time.time())
    job = text.splitlines()[1]
    assert job.startswith("running | step 338/1200 | epoch 2/10 | 1190 img/s | ETA 0:03:12 | updated"), job
    zero, one = rank_line(text, 0), rank_line(text, 1)
    assert "340" in zero and "15.0" in zero and "812" in zero and "+0.1" in zero and "STRAGGLER" not in zero
    assert "338" in one and "31.4" in one and one.rstrip().endswith("STRAGGLER")
    assert f"rank 1: {slow}" in text


def test_leaks_failures_and_a_job_gone_quiet_are_said(tmp_path: Path) -> None:
    leak = "rank 0 (cpu): leaking 2.1 MB/step (tensors)"
    old = time.time() - 60
    folder = write(tmp_path / "r", status(0, leak=leak, time=old), status(1, time=old))
    text = render(folder, time.time())
    assert "no update for 60 s (the job may be gone)" in text.splitlines()[1]
    assert rank_line(text, 0).rstrip().endswith("LEAK") and f"rank 0: {leak}" in text
    write(folder, status(1, state="failed", eta_s=None))
    assert render(folder, time.time()).splitlines()[1].startswith("failed | ") and "ETA -" in render(
        folder, time.time()
    )


def test_files_of_an_earlier_larger_round_are_left_out(tmp_path: Path) -> None:
    """An elastic job that came back on 2 ranks after 4: ranks 2 and 3's files are history."""
    folder = write(tmp_path / "r", status(0), status(1), status(2, world=4), status(3, world=4))
    assert [r["rank"] for r in read_ranks(folder)] == [0, 1]


def test_the_newest_run_is_the_default_and_none_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no training run with live_rank0.json under"):
        newest_run(tmp_path)
    a = write(tmp_path / "a", status(0))
    b = write(tmp_path / "b", status(0))
    os.utime(b / "live_rank0.json", (time.time() - 100, time.time() - 100))
    assert newest_run(tmp_path) == a


def test_without_a_terminal_one_snapshot_is_printed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write(tmp_path / "r", status(0), status(1))
    assert main_top(str(folder), str(tmp_path), once=False) == 0  # pytest's stdout is not a terminal
    out = capsys.readouterr().out
    assert out.startswith(f"torchlaunch top: {folder}\n") and rank_line(out, 1)
    with pytest.raises(LaunchError, match="holds no live_rank"):
        main_top(str(tmp_path), str(tmp_path), once=True)
    with pytest.raises(LaunchError, match="does not exist"):
        main_top(str(tmp_path / "nope"), str(tmp_path), once=True)
    with pytest.raises(LaunchError, match="is a file, not a run directory"):
        main_top(str(folder / "live_rank0.json"), str(tmp_path), once=True)


def test_a_live_file_that_cannot_be_written_warns_once_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from distrib.engine.live import LiveHook, Plan

    ctx = SimpleNamespace(rank=0, world_size=1, device="cpu")
    folder = tmp_path / "gone"  # the run directory vanished (or the disk is full)
    hook = LiveHook(ctx, folder, Plan(10, 1, 8), None, None)  # type: ignore[arg-type]
    run = SimpleNamespace(prog=SimpleNamespace(global_step=1, epoch=0))
    for _ in range(3):
        hook.write(run, "running")  # type: ignore[arg-type]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "launch.py top will not follow this rank" in caplog.text and not folder.exists()
    folder.mkdir()
    hook = LiveHook(ctx, folder, Plan(10, 1, 8), None, None)  # type: ignore[arg-type]
    hook.write(run, "finished")  # type: ignore[arg-type]
    (status,) = read_ranks(folder)
    assert status["state"] == "finished" and status["step"] == 1 and status["eta_s"] is None
