"""Fork only while torch's C++ threads are out of CPython's thread-state lock (CPython gh-112275).

Why: on CPython before 3.11.10 (3.10.15, 3.9.20), a child of ``os.fork()`` takes the runtime's
thread-state lock (HEAD_LOCK) before re-initialising it. If another thread of the parent held
that lock at the instant of the fork, the child waits on it forever, single-threaded, inside
``os.fork()``. The parent's DataLoader then waits for that worker's batches without end:
our CI saw the 2-rank default job hang this way (1 run in ~4), and so did a plain
``launch.py --nproc-per-node 2`` loop (1 in 16).

Who holds the lock without the GIL: torch's gloo threads (``pt_gloo_runloop``). When a
collective's work object is freed by its gloo thread (a blocking all-reduce, all-gather or
broadcast whose Python caller already dropped it), freeing its Python-owned tensors and the
thread-local state captured with it enters Python: pybind11 makes a new thread state, and
``PyThreadState_New`` takes HEAD_LOCK before the GIL. Seen under gdb: the rank's main thread in
``fork`` while a gloo thread was in ``new_threadstate``. A standalone stress (two gloo ranks,
four dropped async all-reduces then an ``os.fork`` per iteration, three busy processes beside them
on 2 cores) hung 2 children in 18,000 forks without this hook and none in 20,000 with it: too rare
to prove the fix by counting; the argument below is what makes it one.

What this does: a before-fork hook (it runs in the forking thread, GIL held) waits until every
torch thread (name ``pt_*``) is asleep and has not run between two looks a short moment apart.
A thread that holds HEAD_LOCK is running (it takes and drops the lock without blocking), and a
sleeping one wakes only for new work (the forking thread enqueues none while forking), for the
GIL (which the forking thread holds: the thread then no longer holds HEAD_LOCK) or for
HEAD_LOCK's release (by a thread that would be seen running). One thing it cannot close: a
collective in flight whose work Python already dropped can finish, and be freed by its gloo
thread, at any moment; the training engine has none (its blocking collectives have finished, and
the stop vote's work is held until it is read, so Python, not gloo's thread, frees it). The wait is bounded
(``MAX_WAIT_S``), and costs about 1 ms a fork (a DataLoader forks ``num_workers`` per epoch).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

LOOK_GAP_S = 0.0005  # between the two looks at the threads
MAX_WAIT_S = 1.0  # a torch thread busy for longer than this (a long collective) is not waited for
_FIXED = {(3, 9): (3, 9, 20), (3, 10): (3, 10, 15), (3, 11): (3, 11, 10)}  # the backports of the fix
_installed: list[bool] = []
_LOST: list[BaseException] = []  # raised by a signal handler while the hook ran (see before_fork)


def affected(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Does this CPython have the fork deadlock (gh-112275)? 3.12 and later never had it."""
    fixed = _FIXED.get(version[:2])
    return fixed is not None and version < fixed


def install() -> bool:
    """Register the before-fork wait once, on affected Pythons (Linux only); True if registered."""
    if _installed or not affected() or not sys.platform.startswith("linux"):
        return bool(_installed)
    os.register_at_fork(before=before_fork)
    _installed.append(True)
    return True


def torch_threads() -> list[int]:
    """Native ids of this process's torch C++ threads (named ``pt_*``: gloo's run loops, NCCL's
    watchdog). Python threads take HEAD_LOCK only while holding the GIL, so they are safe."""
    python = {t.native_id for t in threading.enumerate()}
    found = []
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in python:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("pt_"):
                    found.append(int(tid))
        except OSError:
            continue  # the thread ended
    return found


def look(tid: int) -> tuple[str, str] | None:
    """(scheduler state letter, schedstat line) of one thread; None once it has ended."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return state, f.read()
    except (OSError, IndexError):
        return None


def quiet(tids: list[int], gap_s: float = LOOK_GAP_S) -> bool:
    """Were all ``tids`` asleep at two looks ``gap_s`` apart, without having run in between?"""
    first = [look(t) for t in tids]
    time.sleep(gap_s)  # lets a thread waiting for the GIL through (it no longer holds HEAD_LOCK)
    second = [look(t) for t in tids]
    return all(a is None or (a[0] == "S" and a == b) for a, b in zip(first, second, strict=True))


def wait_quiet(max_wait_s: float = MAX_WAIT_S) -> bool:
    """Wait (bounded) until the torch threads are quiet; False if they were still busy at the end."""
    tids = torch_threads()
    if not tids:
        return True
    deadline = time.monotonic() + max_wait_s
    while not quiet(tids):
        if time.monotonic() > deadline:
            return False
    return True


def before_fork() -> None:
    """The hook. CPython only prints what an at-fork hook raises, so nothing may escape: an
    exception a Python signal handler raised while the hook waited (torch's SIGCHLD handler:
    "DataLoader worker ... is killed by signal") is kept for :func:`take_lost` to raise again."""
    try:
        if not wait_quiet():
            log.debug("forking while a torch thread is busy (longer than %.1f s)", MAX_WAIT_S)
    except OSError:
        log.debug("fork-safety wait failed", exc_info=True)
    except BaseException as e:  # noqa: BLE001 - not ours: a signal handler's, raised again later
        _LOST.append(e)


def take_lost() -> BaseException | None:
    """The first exception a signal handler raised inside the hook since the last call, if any."""
    lost = _LOST[:1]
    _LOST.clear()
    return lost[0] if lost else None
