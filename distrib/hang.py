"""Hang diagnosis: when a collective times out, name the rank that is missing and dump every live stack.

Why: a rank that stops entering collectives (SIGSTOP, a deadlock, a stuck data loader, a
wedged device) makes the others fail after ``dist.timeout_s`` with gloo's "Timed out
waiting 20000ms for recv operation to complete", which names neither the operation nor
the rank. Here each rank keeps a :class:`Watch` (its step and the operation it is in:
plain attribute writes, free) and a daemon thread that looks at one store key once a
second. The rank whose collective times out sets that key; every live rank then dumps its
Python stack (faulthandler, all threads) to ``<run dir>/hang/`` and reports where it is.
A rank that never reports is stopped or stuck outside Python; a rank that reports another
place is not in the collective. The error names both, and the folder with the stacks.

The store is the rendezvous store: under torchrun it lives in the agent, so it answers
even when a rank is frozen.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
FLAG = "hang/flag"
POLL_S = 1.0  # how often the watchdog looks at the flag: one small store request per second
GRACE_S = 3 * POLL_S  # how long the timed-out rank waits for the others' reports
STORE_TIMEOUT_S = 5.0  # store requests during a diagnosis: never wait dist.timeout_s again
Reports = dict[int, dict[str, Any]]  # rank -> where it said it was


@dataclass
class Watch:
    """Where this rank is; the training loop writes it, the diagnosis reads it."""

    step: int = 0
    where: str = "setting up"

    def at(self, where: str, step: int | None = None) -> None:
        self.where = where
        if step is not None:
            self.step = step

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "where": self.where, "pid": os.getpid(), "host": socket.gethostname()}


def stack_file(run_dir: Path, rank: int) -> Path:
    return run_dir / "hang" / f"stack-rank{rank}.txt"


def dump_stack(run_dir: Path, rank: int, watch: Watch) -> Path | None:
    """Every thread's Python stack of this process, with a header saying where the loop was."""
    path = stack_file(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write(f"rank {rank} (pid {os.getpid()}) at step {watch.step}, in {watch.where}\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
    except OSError as e:
        log.warning("could not write the stack dump %s: %s", path, e.strerror)
        return None
    return path


def is_timeout(error: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting"; nccl: "Watchdog caught ... timeout")."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


PEER_LOST = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "communicator was aborted",
)


def is_peer_lost(error: BaseException) -> bool:
    """A collective failed because another rank's process went away (killed, crashed)."""
    text = str(error).lower()
    return any(p in text for p in PEER_LOST)


def peer_lost(ctx: DistContext, watch: Watch, error: BaseException) -> LaunchError:
    """One line instead of a traceback: this rank is fine, another one left the group."""
    first = str(error).strip().splitlines()[0]
    return LaunchError(
        f"rank {ctx.rank}: another rank left the process group during {watch.where} at step {watch.step} "
        f"({first}); its own error, if it had one, is the launcher's; with --max-restarts N the "
        "agent restarts every rank from the newest checkpoint"
    )


class Watchdog:
    """A daemon thread per rank: when any rank raises the hang flag, dump our stack and report."""

    def __init__(self, ctx: DistContext, store: Any, run_dir: Path, watch: Watch):
        self.ctx, self.store, self.run_dir, self.watch = ctx, store, run_dir, watch
        self._done = threading.Event()
        self._reported = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=2 * POLL_S)

    def report(self) -> None:
        """Dump this rank's stack and tell the store where it is (once)."""
        if not self._reported.acquire(blocking=False):
            return
        dump_stack(self.run_dir, self.ctx.rank, self.watch)
        self.store.set(f"hang/rank/{self.ctx.rank}", json.dumps(self.watch.as_dict()))

    def _loop(self) -> None:
        while not self._done.wait(POLL_S):
            try:
                if self.store.check([FLAG]):
                    self.report()
                    return
            except Exception:  # the store is gone (the job is ending): nothing to watch
                return


def diagnose(watchdog: Watchdog, error: BaseException, timeout_s: float) -> LaunchError:
    """On the rank whose collective timed out: wake every rank, collect reports, name who is missing."""
    ctx, watch, store = watchdog.ctx, watchdog.watch, watchdog.store
    reports: Reports = {}
    try:
        store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        store.set(FLAG, str(ctx.rank))
        watchdog.report()
        reports = collect(store, ctx.world_size)
    except Exception as e:  # the store itself is unreachable: say so, keep the rest
        log.warning("hang diagnosis: the rendezvous store did not answer (%s)", e)
        dump_stack(watchdog.run_dir, ctx.rank, watch)
    return LaunchError(describe(watchdog, reports, error, timeout_s))


def collect(store: Any, world_size: int) -> Reports:
    """Every report that arrives within GRACE_S (the watchdogs poll once a second)."""
    reports: Reports = {}
    deadline = time.monotonic() + GRACE_S + POLL_S
    while len(reports) < world_size and time.monotonic() < deadline:
        for r in range(world_size):
            key = f"hang/rank/{r}"
            if r not in reports and store.check([key]):
                reports[r] = json.loads(store.get(key))
        time.sleep(0.1)
    return reports


def describe(watchdog: Watchdog, reports: Reports, error: BaseException, timeout_s: float) -> str:
    """The one error line: the operation, the missing rank(s), where the others are, where the stacks are."""
    ctx, watch = watchdog.ctx, watchdog.watch
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    here = (watch.step, watch.where)
    silent = [r for r in range(ctx.world_size) if r not in reports]
    elsewhere = [r for r, rep in sorted(reports.items()) if (rep["step"], rep["where"]) != here]
    parts = [
        f"rank {ctx.rank} waited dist.timeout_s={timeout_s:g}s in {watch.where} at step {watch.step} "
        f"and gave up ({first})"
    ]
    if silent:
        parts.append(
            f"missing: rank(s) {', '.join(map(str, silent))} never answered (stopped, killed, or stuck "
            "outside Python: no stack)"
        )
    for r in elsewhere:
        rep = reports[r]
        where = f"step {rep['step']}, in {rep['where']}"
        parts.append(f"rank {r} (pid {rep['pid']} on {rep['host']}) is not in it: {where}")
    if not silent and not elsewhere:
        parts.append("every rank reported the same place: a network or device fault, not a missing rank")
    parts.append(f"live ranks' Python stacks: {watchdog.run_dir / 'hang'}")
    return "; ".join(parts)
