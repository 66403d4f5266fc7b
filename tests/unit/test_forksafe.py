"""The fork wait (distrib/forksafe.py) and the never-started worker watch (datasets/workerwatch.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.loader import worker_death
from datasets.workerwatch import watched
from distrib import forksafe
from distrib.seeding import WorkerSeeder


@pytest.mark.parametrize(
    ("version", "hit"),
    [
        ((3, 11, 7), True),
        ((3, 11, 9), True),
        ((3, 11, 10), False),
        ((3, 10, 14), True),
        ((3, 10, 15), False),
        ((3, 12, 0), False),
        ((3, 13, 2), False),
    ],
)
def test_only_pythons_without_the_fix_are_affected(version: tuple[int, int, int], hit: bool) -> None:
    assert forksafe.affected(version) is hit


def _thread(busy: bool) -> tuple[threading.Thread, threading.Event, list[int]]:
    stop, tid = threading.Event(), []

    def body() -> None:
        tid.append(threading.get_native_id())
        while not stop.is_set():
            if not busy:
                stop.wait(5)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    while not tid:
        time.sleep(0.001)
    return t, stop, tid


@pytest.mark.parametrize("busy", [True, False])
def test_a_running_thread_is_not_quiet_a_sleeping_one_is(busy: bool) -> None:
    t, stop, tid = _thread(busy)
    try:
        time.sleep(0.05)
        assert forksafe.quiet(tid, gap_s=0.01) is (not busy)
        assert forksafe.torch_threads() == []  # Python threads are never waited for
    finally:
        stop.set()
        t.join(5)


def test_a_thread_that_ended_counts_as_quiet() -> None:
    assert forksafe.quiet([2**22 + 7]) is True  # no such thread


class Slow(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.6)  # a first batch slower than the start watch's limit below
        return torch.tensor(i)


def _hang(worker_id: int) -> None:
    time.sleep(15)  # stands in for a worker stuck inside os.fork(): it never runs WorkerSeeder


def test_a_worker_that_never_starts_is_stopped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    loader = DataLoader(Slow(), num_workers=1, worker_init_fn=_hang)
    with pytest.raises(RuntimeError) as err:
        list(watched(iter(loader), rank=3, start_s=1.0))
    message = str(worker_death(err.value, 3, 1))
    assert "rank 3: a DataLoader worker" in message and "hung inside os.fork()" in message, message
    assert "OOM" not in message
    assert "never started" in caplog.text


def test_a_started_worker_with_slow_batches_is_left_alone() -> None:
    loader = DataLoader(Slow(), num_workers=1, worker_init_fn=WorkerSeeder(0, 0))
    assert [int(b) for b in watched(iter(loader), rank=0, start_s=0.3)] == [0, 1]


def test_a_signal_handlers_error_inside_the_hook_is_raised_again_by_the_next_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPython only prints what an at-fork hook raises: torch's SIGCHLD handler ("DataLoader
    worker ... is killed by signal") firing while the hook waits must not vanish with it."""
    import os
    import signal

    def torch_sigchld(signum: int, frame: object) -> None:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    def quiet_with_a_signal(tids: list[int], gap_s: float = 0) -> bool:
        os.kill(os.getpid(), signal.SIGUSR1)  # arrives while the hook waits
        time.sleep(0.01)
        return True

    old = signal.signal(signal.SIGUSR1, torch_sigchld)
    try:
        monkeypatch.setattr(forksafe, "torch_threads", lambda: [1])
        monkeypatch.setattr(forksafe, "quiet", quiet_with_a_signal)
        forksafe.before_fork()  # must not raise: CPython would only print it
    finally:
        signal.signal(signal.SIGUSR1, old)
    with pytest.raises(RuntimeError, match="pid 4242"):
        next(watched(iter([1, 2]), rank=0))
    assert list(watched(iter([1, 2]), rank=0)) == [1, 2]  # raised once


class Items(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] == "Z"


def test_a_worker_killed_after_its_last_batch_fails_the_epoch_even_when_torchs_error_was_lost() -> None:
    """torch's SIGCHLD handler raises wherever the main thread is; a ``__del__`` or a library's
    ``except Exception`` there drops it. A worker killed after delivering its last batch (the
    OOM killer, at an epoch's end) must still not pass: the epoch's end says so."""
    import os
    import signal

    loader = DataLoader(Items(), num_workers=2, batch_size=1, worker_init_fn=WorkerSeeder(0, 0))
    it = iter(loader)
    batches = watched(it, rank=2)
    got = [int(next(batches)) for _ in range(3)]  # worker 0 made batches 0 and 2: it is done
    victim = it._workers[0].pid
    lost = False
    try:  # stands in for the place that swallows torch's error
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _zombie(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    except RuntimeError as e:
        lost = "is killed by signal" in str(e)
    assert lost, "torch's SIGCHLD handler did not fire: the test did not set up its case"
    with pytest.raises(RuntimeError) as err:
        for b in batches:
            got.append(int(b))
    assert got == [0, 1, 2, 3]  # every batch came: only the end can tell
    message = str(worker_death(err.value, 2, 2))
    assert f"rank 2: DataLoader worker (pid {victim}) was killed by signal Killed" in message, message
    assert "OOM killer" in message


def test_workers_that_ended_well_end_the_epoch_quietly() -> None:
    loader = DataLoader(Items(), num_workers=2, batch_size=1, worker_init_fn=WorkerSeeder(0, 0))
    for _ in range(2):
        assert [int(b) for b in watched(iter(loader), rank=0)] == [0, 1, 2, 3]


class _ResetMidHandover:
    """A DataLoader iterator whose worker was killed while it handed a batch over: torch lets the
    connection's reset out as it is while the worker is not yet reaped (seen in CI)."""

    def __init__(self, real: object) -> None:
        self._real, self._workers = real, real._workers

    def __iter__(self) -> _ResetMidHandover:
        return self

    def __next__(self) -> object:
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_worker_killed_while_handing_a_batch_over_is_the_one_line_not_a_reset_connection() -> None:
    import os
    import signal

    loader = DataLoader(Items(), num_workers=2, batch_size=1, worker_init_fn=WorkerSeeder(0, 0))
    real = iter(loader)
    next(real)
    victim = real._workers[1].pid
    try:  # torch's SIGCHLD handler raises here (and is dropped): this test is about the reset
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _zombie(victim) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    except RuntimeError:
        pass
    with pytest.raises(RuntimeError) as err:
        next(watched(_ResetMidHandover(real), rank=1))
    message = str(worker_death(err.value, 1, 2))
    assert f"rank 1: DataLoader worker (pid {victim}) was killed by signal Killed" in message, message
    assert isinstance(err.value.__cause__, ConnectionResetError)
    real._shutdown_workers()


def test_a_reset_connection_with_every_worker_alive_is_not_called_a_death() -> None:
    loader = DataLoader(Items(), num_workers=1, batch_size=1, worker_init_fn=WorkerSeeder(0, 0))
    real = iter(loader)
    with pytest.raises(ConnectionResetError):
        next(watched(_ResetMidHandover(real), rank=0))
    real._shutdown_workers()
