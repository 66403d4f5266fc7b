"""Cancellation: SIGTERM or SIGINT asks a run to stop at the next step boundary; a second one ends it now.

Why not Python's defaults: SIGTERM kills a rank mid-step (no checkpoint, and the agent's
traceback), SIGINT raises KeyboardInterrupt wherever the rank happens to be (53 lines of
traceback). Here the first signal only sets a flag; the training loop looks at it after
every optimizer step, every rank agrees through one small asynchronous all-reduce, rank 0 writes a
checkpoint and all exit with 128 + the signal's number and one log line.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A rank's parent-death signal. Linux sends it once per exiting thread of a SIGKILLed agent
# (the rank is re-parented to a sibling thread, which then dies too), so repeats of it must
# not count as "a second signal"; SIGHUP ("the controlling process is gone") says what happened.
AGENT_GONE = signal.SIGHUP
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
LOADER_WORKER = "loader_worker"  # a started DataLoader worker's name (``ps``, the start watch)


@dataclass
class StopRequest:
    """Set by the first SIGTERM/SIGINT; read by the loop at step boundaries."""

    signum: int = 0
    received: int = 0  # signals this process got itself (a stop agreed with other ranks is not one)

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    @property
    def name(self) -> str:
        if self.signum == AGENT_GONE:
            return "SIGHUP (the launcher that started this rank is gone)"
        return signal.Signals(self.signum).name if self.signum else ""

    def handle(self, signum: int, frame: object) -> None:
        if signum == AGENT_GONE and parent_alive():  # a thread of the agent ended, not the agent
            log.debug("SIGHUP while the launcher (pid %d) is alive: one of its threads ended", os.getppid())
            return
        if self.received and signum == AGENT_GONE:  # the dying agent's other threads: the same news
            return
        if self.received:  # the second signal this process got: no more waiting
            os._exit(128 + signum)
        self.received += 1
        # A stop already agreed on another rank's signal keeps its signal; the agent's SIGTERM
        # that follows (it stops every rank once one has exited) is this process's first: the
        # rank finishes its stop (rank 0's checkpoint) instead of dying in the middle of it.
        self.signum = self.signum or signum
        if signum == AGENT_GONE:
            orphan_deadline()


ORPHAN_GRACE_S = 120.0  # a rank whose launcher died: time to reach a step boundary and checkpoint


def orphan_deadline() -> None:
    """A rank whose launcher is gone stops at its next step; this bounds the wait for that step.

    Why: a rank stuck where no step boundary comes (a DataLoader worker hung in fork, a wedged
    device) would otherwise live on with nobody to stop it. After ``ORPHAN_GRACE_S`` a daemon
    thread says so and exits; SIGALRM's default action, 15 s later, ends a process whose Python
    can no longer run at all.
    """
    grace_s = ORPHAN_GRACE_S

    def give_up() -> None:
        log.error("the launcher is gone and no step boundary came within %.0f s: exiting", grace_s)
        logging.shutdown()
        os._exit(128 + AGENT_GONE)

    timer = threading.Timer(grace_s, give_up)
    timer.daemon = True
    timer.start()
    with contextlib.suppress(ValueError, OSError):  # not the main thread / no alarm here
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(grace_s) + 15)


class Stopped(Exception):  # noqa: N818 - the run ended on request, not an error
    """The run stopped at a step boundary on a signal; its checkpoint is written."""

    def __init__(self, request: StopRequest, message: str):
        super().__init__(message)
        self.exit_code = request.exit_code


_CURRENT: list[StopRequest] = []  # the request installed in this process (signal handlers are global)
_PARENT: list[int] = []  # the pid whose death die_with_parent asked to hear of


def install() -> StopRequest:
    """Route SIGTERM, SIGINT and SIGHUP to a fresh :class:`StopRequest` (main thread only)."""
    request = StopRequest()
    for sig in SIGNALS:
        signal.signal(sig, request.handle)
    _CURRENT[:] = [request]
    return request


def current() -> StopRequest:
    """The installed request (long passes before training look at it between items); an inert one
    when none is installed (a library call, a test)."""
    return _CURRENT[0] if _CURRENT else StopRequest()


def die_with_parent(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False where it cannot.

    If the parent is already gone (we were re-parented to init), ``sig`` is sent at once.
    """
    if not _prctl(PR_SET_PDEATHSIG, int(sig)):
        return False
    _PARENT[:] = [os.getppid()]
    if os.getppid() == 1:  # the parent died before the call: nobody would ever tell us
        os.kill(os.getpid(), sig)
    return True


def _prctl(option: int, arg: int | bytes) -> bool:
    """Linux's prctl(2); False where it is missing or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, arg) == 0
    except (OSError, AttributeError):
        return False


def parent_alive() -> bool:
    """Is the process die_with_parent watches still our parent?

    Linux sends the parent-death signal when the *thread* that started us exits. torch's
    elastic agent starts ranks from helper threads too, so one of them ending (while the agent
    lives on, e.g. when a node of a multi-node job left) must not read as "the launcher is gone".
    """
    return bool(_PARENT) and _PARENT[0] != 1 and os.getppid() == _PARENT[0]


def loader_worker() -> None:
    """In a DataLoader worker: the rank that forked it owns its lifetime.

    The worker leaves the rank's process group. torchrun's agent signals a rank's whole group,
    and a terminal's Ctrl-C the whole foreground group; a worker killed that way makes torch
    raise "DataLoader worker is killed by signal" in the middle of the rank's step, while the
    rank itself would stop cleanly at the step boundary and shut its workers down. (Ignoring
    the signals instead would deadlock Python's exit, which terminates and joins them.)
    When the rank dies, its workers get SIGKILL: they hold copies of the rank's gloo sockets,
    so the other ranks otherwise noticed a killed rank only after the workers' own 5 s check.
    """
    _prctl(PR_SET_NAME, LOADER_WORKER.encode())  # "I started": see datasets/workerwatch.py
    with contextlib.suppress(OSError):  # already a group leader: nothing to leave
        os.setpgid(0, 0)
    die_with_parent(signal.SIGKILL)


class Terminated(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """SIGTERM while a user's script runs (the agent stopping every rank after one failed)."""


class TermGuard:
    """SIGTERM around a user's script (``run``): while armed it ends the script with
    :class:`Terminated`, so the monitor still writes what it measured and rank 0 the summary;
    unarmed it only records the signal. Installed unarmed as the worker starts: with Python's
    default a rank still importing torch when another rank failed died at once, and rank 0's
    summary of the others' reports was never written."""

    def __init__(self, armed: bool = True) -> None:
        self.armed, self.received = armed, False

    def install(self) -> TermGuard:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self)
        return self

    def arm(self) -> None:
        """From now on SIGTERM raises; one that came before raises here."""
        self.armed = True
        if self.received:
            self.armed = False
            raise Terminated()

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        if self.armed:
            self.armed = False
            raise Terminated()
