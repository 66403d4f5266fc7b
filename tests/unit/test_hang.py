"""Hang diagnosis in one process: a real store, real watchdog threads, real stack dumps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from distrib import hang
from distrib.context import DistContext


def ctx(rank: int, world: int = 3) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_world_size=world, launcher="torchrun")


def test_a_woken_watchdog_dumps_its_stack_and_reports_where_it_is(tmp_path: Path) -> None:
    store = dist.HashStore()
    watch = hang.Watch(step=7, where="loading a batch")
    dog = hang.Watchdog(ctx(2), store, tmp_path, watch).start()
    try:
        store.set(hang.FLAG, "0")
        deadline = time.monotonic() + 5
        while not store.check(["hang/rank/2"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        dog.stop()
    report = json.loads(store.get("hang/rank/2"))
    assert (report["step"], report["where"]) == (7, "loading a batch")
    text = hang.stack_file(tmp_path, 2).read_text()
    assert text.startswith("rank 2 (pid") and "at step 7, in loading a batch" in text
    assert "_loop" in text  # faulthandler wrote the watchdog thread's own frames too


def test_diagnosis_names_the_silent_rank_and_the_one_elsewhere(tmp_path: Path) -> None:
    store = dist.HashStore()
    other = hang.Watchdog(ctx(2), store, tmp_path, hang.Watch(step=5, where="the forward pass")).start()
    mine = hang.Watchdog(ctx(0), store, tmp_path, hang.Watch(step=5, where="the backward pass"))
    error = RuntimeError("[gloo] Timed out waiting 8000ms for recv operation to complete")
    try:
        message = str(hang.diagnose(mine, error, 8))
    finally:
        other.stop()
    assert "rank 0 waited dist.timeout_s=8s in the backward pass at step 5" in message
    assert "Timed out waiting 8000ms for recv" in message
    assert "missing: rank(s) 1 never answered" in message
    assert "rank 2 (pid" in message and "is not in it: step 5, in the forward pass" in message
    assert str(tmp_path / "hang") in message
    assert hang.stack_file(tmp_path, 0).exists() and hang.stack_file(tmp_path, 2).exists()
    assert not hang.stack_file(tmp_path, 1).exists()


def test_when_every_rank_is_in_the_same_place_it_says_so(tmp_path: Path) -> None:
    store = dist.HashStore()
    same = hang.Watch(step=3, where="the stop-flag all-reduce")
    dogs = [hang.Watchdog(ctx(r, 2), store, tmp_path, same) for r in range(2)]
    dogs[1].start()
    try:
        message = str(hang.diagnose(dogs[0], RuntimeError("Timed out"), 5))
    finally:
        dogs[1].stop()
    assert "never answered" not in message and "every rank reported the same place" in message


@pytest.mark.parametrize(
    ("text", "timeout"),
    [
        ("[unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete", True),
        ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)", True),
        ("Connection closed by peer [127.0.0.1]:4242", False),
        ("mat1 and mat2 shapes cannot be multiplied", False),
    ],
)
def test_only_timeouts_start_a_diagnosis(text: str, timeout: bool) -> None:
    assert hang.is_timeout(RuntimeError(text)) is timeout


@pytest.mark.parametrize(
    ("text", "lost"),
    [
        ("[pair.cc:545] Read error [127.0.0.1]:11904: Connection reset by peer. This is typically", True),
        ("[pair.cc:589] Connection closed by peer [127.0.0.1]:4242", True),
        ("[unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete", False),
    ],
)
def test_a_peer_that_went_away_is_one_line(text: str, lost: bool) -> None:
    assert hang.is_peer_lost(RuntimeError(text)) is lost
    if lost:
        message = str(
            hang.peer_lost(ctx(0, 2), hang.Watch(step=8, where="the backward pass"), RuntimeError(text))
        )
        assert message.startswith(
            "rank 0: another rank left the process group during the backward pass at step 8"
        )
        assert "--max-restarts" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "DataLoader worker (pid 22152) is killed by signal: Killed. ",
            "was killed by signal Killed; SIGKILL is",
        ),
        ("DataLoader worker (pid 9) is killed by signal: Terminated.", "was killed by signal Terminated"),
        (
            "DataLoader worker (pid(s) 22466, 22467) exited unexpectedly",
            "(pid 22466, 22467) exited unexpectedly",
        ),
    ],
)
def test_a_dead_dataloader_worker_is_one_line_naming_the_likely_cause(text: str, needle: str) -> None:
    from datasets.loader import worker_death

    error = worker_death(RuntimeError(text), rank=1, num_workers=4)
    assert error is not None and needle in str(error) and str(error).startswith("rank 1: DataLoader worker")
    assert ("OOM killer" in str(error)) == ("Terminated" not in text)
    assert worker_death(RuntimeError("Connection reset by peer"), 0, 4) is None
