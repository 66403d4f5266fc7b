"""One rank's optimizer step split into phases: data wait, compute, communication wait, optimizer, rest.

Why these phases: in a DDP job every rank waits at each gradient all-reduce for the slowest one,
so a rank's own "compute" and "data" say whether it is slow, while "comm" (time blocked in the
gradient all-reduce beyond what overlapped with the backward pass) says how long it waited for
the others. How each is measured, on every optimizer step (micro-batches of an accumulated step
add up):

- data: the time the training loop waits for its next batch (``next()`` on the loader);
- comm (DDP, the micro-batch that synchronises): from the moment the last parameter's gradient
  was accumulated (a post-accumulate-grad hook: the backward computation is done) to the return
  of ``backward()``, which DDP holds until every bucket's all-reduce finished; plus, on the CPU,
  DDP's buffer broadcast before each forward (rank 0 waits there for a late rank);
- compute: forward + backward minus comm; optimizer: ``optimizer_step`` (clip, step, schedule);
- rest: the step's wall time minus all of the above (metric sums, hooks, the stop vote, saves).

On CUDA the compute phases are read from CUDA events one step later (no synchronisation in the
step); data and rest stay host clocks. ``cpu`` is the process's CPU seconds per wall second of
compute (forward and backward): a CPU rank well below the others' figure got less CPU than it
wanted, whereas a rank waiting on a disk or a loader does not show there; ``queue`` is the
time the training thread spent runnable but waiting for a CPU (Linux's run queue,
``/proc/thread-self/schedstat``) per second of compute: the direct sign of a shared core.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PHASES = ("data", "compute", "comm", "optimizer", "rest")
COLUMNS = ("step", "wall", *PHASES, "cpu", "queue")
SCHEDSTAT = Path("/proc/thread-self/schedstat")  # Linux: this thread's CPU time and run-queue wait, ns


def csv_row(row: dict[str, float]) -> list[object]:
    """A row of timing_rank<N>.csv: the step, then COLUMNS' seconds to the microsecond."""
    return [int(row["step"]), *(f"{row[k]:.6f}" for k in COLUMNS[1:])]


_SCHEDSTAT_FDS: dict[tuple[int, int], int] = {}  # (pid, kernel thread id) -> its schedstat (-1: none)


def run_queue_wait() -> float:
    """Seconds this thread has waited for a CPU while runnable (0 where Linux does not say).

    The file stays open per thread and is re-read with ``pread`` at offset 0 (procfs regenerates
    it): about 1 us, where opening it each time cost 15 us idle and 50+ us on a busy 2-core host,
    twice per step."""
    # the kernel's ids: a forked child keeps the parent's Python thread ids, and Python reuses them
    ident = (os.getpid(), threading.get_native_id())
    fd = _SCHEDSTAT_FDS.get(ident)
    if fd is None:
        try:
            fd = os.open(SCHEDSTAT, os.O_RDONLY)  # /proc/thread-self: the thread that opens it
        except OSError:
            fd = -1
        _SCHEDSTAT_FDS[ident] = fd
    if fd < 0:
        return 0.0
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class _Pending:
    """A CUDA step whose event timings are read once its last event completed."""

    row: dict[str, float]
    events: list[tuple[torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]]  # start, last grad, end
    opt: list[tuple[torch.cuda.Event, torch.cuda.Event]]


class StepClock:
    """Phase times of every optimizer step on this rank; finished rows in :attr:`rows`."""

    def __init__(self, model: nn.Module, comm_hooks: bool, cuda: bool):
        self.cuda = cuda
        self.rows: list[dict[str, float]] = []
        self.acc = dict.fromkeys(PHASES, 0.0)
        self.last_grad = 0.0
        self._handles = []
        self._grad_event: torch.cuda.Event | None = None
        self._entered = self._inner = 0.0
        self.comm_hooks = comm_hooks
        self._grad_hooks: dict[int, Any] = {}  # id(parameter) -> handle; one left after the first backward
        self._last_param = 0
        if comm_hooks:
            hook = self._cuda_grad if cuda else self._cpu_grad
            trainable = [p for p in model.parameters() if p.requires_grad]
            self._grad_hooks = {id(p): p.register_post_accumulate_grad_hook(hook) for p in trainable}
            inner = getattr(model, "module", None)
            if inner is not None and not cuda:  # DDP's buffer broadcast before the forward: a wait too
                self._handles.append(model.register_forward_pre_hook(self._enter))
                self._handles.append(inner.register_forward_pre_hook(self._enter_inner))
        self._pending: deque[_Pending] = deque()
        self._events: list = []
        self._opt_events: list = []
        self.restart()

    def restart(self) -> None:
        """A step starts now (after a pause that is not a step's: validation, a checkpoint)."""
        self.t0, self.cpu_fb, self._fb_cpu0 = time.perf_counter(), 0.0, 0.0
        self.queue_fb = self._fb_queue0 = 0.0
        self.acc = dict.fromkeys(PHASES, 0.0)
        self._events, self._opt_events = [], []

    def _enter(self, *_: object) -> None:
        self._entered = time.perf_counter()

    def _enter_inner(self, *_: object) -> None:
        self._inner = time.perf_counter()

    def _cpu_grad(self, param: torch.Tensor) -> None:
        self.last_grad = time.perf_counter()
        self._last_param = id(param)

    def _cuda_grad(self, param: torch.Tensor) -> None:
        if self._grad_event is not None:
            self._grad_event.record()
        self._last_param = id(param)

    def _keep_last_hook(self) -> None:
        """After the first synchronising backward, only the parameter accumulated last keeps its hook:
        a Python hook per parameter in every backward cost about 1% of a 65 ms CPU step. (A model
        whose last gradient changes from step to step is then timed from the first one's: its comm
        reads a little high.)"""
        if len(self._grad_hooks) < 2 or self._last_param not in self._grad_hooks:
            return
        for key in [k for k in self._grad_hooks if k != self._last_param]:
            self._grad_hooks.pop(key).remove()

    def add(self, phase: str, seconds: float) -> None:
        self.acc[phase] += seconds

    def begin_forward(self) -> float:
        """Start of a micro-batch's forward + backward; the token for :meth:`end_backward`."""
        if self.cuda:
            start, grad, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            self._grad_event = grad
            self._events.append((start, grad, end))
        self.last_grad = 0.0
        self._fb_cpu0, self._fb_queue0 = time.process_time(), run_queue_wait()
        return time.perf_counter()

    def end_backward(self, started: float, sync: bool) -> None:
        now = time.perf_counter()
        self.cpu_fb += time.process_time() - self._fb_cpu0
        self.queue_fb += run_queue_wait() - self._fb_queue0
        if sync:
            self._keep_last_hook()
        if self.cuda:
            self._events[-1][2].record()
            self._grad_event = None
            return
        comm = max(0.0, now - self.last_grad) if sync and self.comm_hooks and self.last_grad else 0.0
        if self._inner > self._entered > started:  # DDP synchronised its buffers before this forward
            comm += self._inner - self._entered
        self.acc["comm"] += comm
        self.acc["compute"] += now - started - comm

    @contextlib.contextmanager
    def optimizer(self) -> Iterator[None]:
        """Around ``optimizer_step`` (on CUDA, between two events as well)."""
        pair = None
        if self.cuda:
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
        started = time.perf_counter()
        yield
        self.acc["optimizer"] += time.perf_counter() - started
        if pair is not None:
            pair[1].record()
            self._opt_events.append(pair)

    def end_step(self, step: int) -> None:
        """The optimizer step ``step`` ended (its hooks and the stop vote included)."""
        now = time.perf_counter()
        wall = now - self.t0
        compute = max(self.acc["compute"], 1e-9)
        row = {"step": float(step), "wall": wall, **self.acc, "cpu": self.cpu_fb / compute}
        row["queue"] = self.queue_fb / compute
        if self.cuda:
            self._pending.append(_Pending(row, self._events, self._opt_events))
            self._read_cuda(block=False)
        else:
            row["rest"] = max(0.0, wall - sum(row[p] for p in PHASES if p != "rest"))
            self.rows.append(row)
        self.t0, self.cpu_fb, self.queue_fb = now, 0.0, 0.0
        self.acc = dict.fromkeys(PHASES, 0.0)
        self._events, self._opt_events = [], []

    def _read_cuda(self, block: bool) -> None:
        """Rows of CUDA steps whose events completed (all of them when ``block``)."""
        while self._pending:
            item = self._pending[0]
            last = item.opt[-1][1] if item.opt else (item.events[-1][2] if item.events else None)
            if last is not None and not block and not last.query():
                return
            if last is not None:
                last.synchronize()
            self._pending.popleft()
            row = item.row
            for start, grad, end in item.events:
                total = start.elapsed_time(end) / 1000
                comm = grad.elapsed_time(end) / 1000 if self.comm_hooks and grad.query() else 0.0
                row["compute"] += total - comm
                row["comm"] += comm
            row["optimizer"] = sum(a.elapsed_time(b) / 1000 for a, b in item.opt) or row["optimizer"]
            row["rest"] = max(0.0, row["wall"] - sum(row[p] for p in PHASES if p != "rest"))
            self.rows.append(row)

    def flush(self) -> None:
        """Every step's row, waiting for CUDA events still in flight (the run's end)."""
        if self.cuda:
            self._read_cuda(block=True)

    def close(self) -> None:
        for h in [*self._handles, *self._grad_hooks.values()]:
            h.remove()
        self._handles, self._grad_hooks = [], {}
