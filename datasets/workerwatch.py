"""A DataLoader worker that never starts becomes an error, not a silent wait without end.

Why: a worker forked while another thread of the rank held CPython's thread-state lock waits
on that lock forever inside ``os.fork()`` (CPython gh-112275, before 3.11.10; see
``distrib/forksafe.py``, which makes it rare, not impossible). It is alive, so torch's
DataLoader, which only checks that its workers live, waits for its batches for ever: a
one-rank job hangs, and a multi-rank one hangs until the others' collective timeout
(``dist.timeout_s``, 10 minutes by default).

How: every worker renames itself ``loader_worker`` the moment it runs Python again
(``signals.loader_worker``, from its ``worker_init_fn``: a fork takes milliseconds). ``START_S``
after an epoch's iterator forked its workers, a worker that is alive and still unnamed never
started; it is killed (SIGKILL), the DataLoader then fails within its 5 s liveness check, and
:func:`never_started` turns that failure into one line that says what happened and what to do.

And a worker killed once its batches were all delivered is an error too, found when the epoch
ends (:func:`killed_worker`): torch's only word of it is an exception its SIGCHLD handler raises
wherever the main thread happens to be, and some places drop it. So is one killed while it
handed a batch over, which torch lets out as a reset connection.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

from distrib import forksafe
from distrib.signals import LOADER_WORKER, SIGNALS

log = logging.getLogger(__name__)
T = TypeVar("T")
HANDOVER_WAIT_S = 2.0  # a worker whose connection reset: the time it has to be seen ended
START_S = 30.0  # a worker unnamed this long after its fork is stuck (a healthy start takes ms)
_KILLED: set[int] = set()  # workers stopped here: their death is not the OOM killer's


def started(pid: int) -> bool | None:
    """Has worker ``pid`` run its ``worker_init_fn``? None once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == LOADER_WORKER
    except OSError:
        return None


def check_started(workers: list[Any], rank: int) -> list[int]:
    """Kill the live workers of ``workers`` (multiprocessing processes) that never started."""
    stuck = [w.pid for w in workers if w.is_alive() and started(w.pid) is False]
    for pid in stuck:
        # is_alive() just said it is our unreaped child: the pid cannot belong to anyone else
        log.error(
            "rank %d: DataLoader worker (pid %d) never started, %.0f s after its fork: it is stuck "
            "inside os.fork() (CPython's fork deadlock, gh-112275); stopping it so the run fails "
            "instead of waiting for ever",
            rank,
            pid,
            START_S,
        )
        _KILLED.add(pid)
        os.kill(pid, signal.SIGKILL)
    return stuck


def watched(it: Iterator[T], rank: int, start_s: float = START_S) -> Iterator[T]:
    """``it``'s items; a worker of ``it`` (a multi-process DataLoader iterator) that has not
    started ``start_s`` after the iterator was made is stopped (see the module's docstring).
    First, an error a signal handler raised during the forks (lost by CPython) is raised here."""
    lost = forksafe.take_lost()
    if lost is not None:  # a signal handler's error raised while the workers were forked
        raise lost
    workers = list(getattr(it, "_workers", []))
    if not workers:
        yield from it
        return
    timer = threading.Timer(start_s, check_started, (workers, rank))
    timer.daemon = True
    timer.start()
    try:
        yield from it
    except (ConnectionError, EOFError) as e:  # a worker killed while it handed a batch over
        death = killed_worker(workers, wait_s=HANDOVER_WAIT_S)
        if death is None:
            raise
        raise RuntimeError(death) from e
    finally:
        timer.cancel()
    death = killed_worker(workers)
    if death is not None:
        raise RuntimeError(death)


def killed_worker(workers: list[Any], wait_s: float = 0.0) -> str | None:
    """torch's error (its words, for :func:`datasets.loader.worker_death`) for a worker that a
    signal killed; None when none did (``wait_s``: how long to wait for one to end).

    At an epoch's end: a worker whose batches had all arrived. Mid-epoch: torch receives a batch's
    shared memory over a connection to the worker that made it; a worker killed during that
    hand-over resets the connection, and torch, seeing the worker still alive (not yet reaped),
    lets ``ConnectionResetError`` out as it is (a traceback, not the one line; seen in CI).

    Why look: torch learns of a worker's death from its SIGCHLD handler, which raises in the main
    thread wherever that thread is. Inside a ``__del__``, a weakref or GC callback, an at-fork hook
    or a library's ``except Exception``, that error is dropped, and a worker that had already
    delivered its last batch (the OOM killer's victim, say) then passed without a word: the
    epoch ended normally (by then torch has joined its workers). Not counted: the stop signals
    (torch's own SIGTERM to a worker slow to stop; a Ctrl-C, which the rank handles itself).
    """
    deadline = time.monotonic() + wait_s
    while True:
        for w in workers:
            code = w.exitcode  # joined by torch at the epoch's end
            if code is not None and code < 0 and -code not in SIGNALS:
                name = signal.strsignal(-code) or f"signal {-code}"
                return f"DataLoader worker (pid {w.pid}) is killed by signal: {name}."
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def never_started(pids: list[int], rank: int) -> str | None:
    """The one-line error for a loader failure caused by stopping a never-started worker."""
    if not any(p in _KILLED for p in pids):
        return None
    return (
        f"rank {rank}: a DataLoader worker (pid {', '.join(map(str, pids))}) hung inside os.fork() "
        f"and was stopped after {START_S:.0f} s: CPython's fork deadlock (gh-112275), fixed in "
        "Python 3.10.15, 3.11.10 and 3.12; upgrade Python, or rerun (it is rare; checkpoint.resume = "
        "'auto' continues the run)"
    )
