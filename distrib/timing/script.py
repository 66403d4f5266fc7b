"""The step breakdown around a user's own, unchanged script (``run``, ``memcheck -- SCRIPT``).

What torch lets us see without a line of the script changed, and so what is measured:

- step boundaries: torch's global optimizer-step hooks (pre and post): ``optimizer`` is the time
  inside ``optimizer.step()``; every optimizer's step is a step, as for the memory monitor;
- the model: the first outermost module with trainable parameters whose forward runs outside a
  DataLoader (found by a global forward pre-hook during the first step, then hooked alone);
  ``compute`` runs from its first forward in a step to ``optimizer.step()``, less data waits;
- ``comm`` (a DDP model): from its last gradient's accumulation to ``optimizer.step()``: the
  all-reduce DDP holds ``backward()`` for, plus whatever the script does between ``backward()``
  and ``step()`` (gradient clipping, logging) - the script's lines cannot be told apart;
- ``data``: time inside a torch DataLoader iterator's ``__next__`` (its class method wrapped
  for the run, restored after): another loader is not seen and lands in ``rest``;
- ``rest``: the step's wall time less the above (the script's own code, its logging).

No collective of ours runs inside the script (its ranks may step unevenly): each rank writes
``timing_rank<N>.csv``; rank 0 compares the files afterwards with the same windows and judge
as ``train`` (distrib/timing/straggler.py) and puts ``timing`` into summary.json.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from distrib.config import TimingSection
from distrib.context import DistContext
from distrib.timing.clock import COLUMNS, PHASES, StepClock, csv_row
from distrib.timing.straggler import Judge, WindowStats, straggler_check

log = logging.getLogger(__name__)


class ScriptTiming:
    """torch's global hooks feeding a :class:`StepClock` for one rank of a user's script."""

    def __init__(self, ctx: DistContext, run_dir: Path):
        self.ctx, self.run_dir = ctx, run_dir
        self.clock: StepClock | None = None
        self.model: Any = None
        self.began = 0.0  # the step's first forward (0: none yet)
        self.data_at_begin = 0.0
        self.in_data = False
        self.steps = 0
        self._handles: list[Any] = []
        self._opt: Any = None
        self._next: Any = None

    def install(self) -> ScriptTiming:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        self._handles = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]
        self._finder = register_module_forward_pre_hook(self._find_model)
        original = self._next = _BaseDataLoaderIter.__next__
        timing = self

        def timed_next(it: Any) -> Any:
            started, timing.in_data = time.perf_counter(), True
            try:
                return original(it)
            finally:
                timing.in_data = False
                if timing.clock is not None:
                    timing.clock.add("data", time.perf_counter() - started)

        _BaseDataLoaderIter.__next__ = timed_next  # type: ignore[method-assign]
        return self

    def _find_model(self, module: Any, args: Any) -> None:
        """Global forward pre-hook until the model is known: the outermost trainable module."""
        if self.model is not None or self.in_data or not any(p.requires_grad for p in module.parameters()):
            return
        import torch

        self.model = module
        self._finder.remove()
        ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        self.clock = StepClock(module, comm_hooks=ddp, cuda=self.ctx.is_cuda)
        self._handles.append(module.register_forward_pre_hook(self._forward))
        self._forward(module, args)

    def _forward(self, module: Any, args: Any) -> None:
        if self.clock is not None and not self.began:
            self.data_at_begin = self.clock.acc["data"]
            self.began = self.clock.begin_forward()

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        clock = self.clock
        if clock is None:
            return
        if self.began:
            clock.end_backward(self.began, sync=True)
            clock.acc["compute"] = max(0.0, clock.acc["compute"] - (clock.acc["data"] - self.data_at_begin))
            self.began = 0.0
        self._opt = clock.optimizer()
        self._opt.__enter__()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.clock is None or self._opt is None:
            return
        self._opt.__exit__(None, None, None)
        self._opt = None
        self.clock.end_step(self.steps)

    def finish(self) -> None:
        """Hooks off, the DataLoader restored; this rank's rows and where it ran written."""
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        for h in self._handles:
            h.remove()
        if self.model is None:
            self._finder.remove()
        if self._next is not None:
            _BaseDataLoaderIter.__next__ = self._next  # type: ignore[method-assign]
        if self.clock is None:
            return
        self.clock.flush()
        self.clock.close()
        write_rows(self.run_dir / f"timing_rank{self.ctx.rank}.csv", self.clock.rows)
        where = {"rank": self.ctx.rank, "node": platform.node(), "device": str(self.ctx.device)}
        (self.run_dir / f"timing_rank{self.ctx.rank}.json").write_text(json.dumps(where))


def write_rows(path: Path, rows: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(COLUMNS)
        for row in rows:
            out.writerow(csv_row(row))


def read_rank(run_dir: Path, rank: int) -> tuple[dict[str, Any], list[dict[str, float]]] | None:
    """A rank's place and rows; rows cut short or damaged are left out with a warning (a rank killed
    while writing), and a rank without readable files is left out of the comparison."""
    where, path = run_dir / f"timing_rank{rank}.json", run_dir / f"timing_rank{rank}.csv"
    if not (where.is_file() and path.is_file()):
        return None
    try:
        place = json.loads(where.read_text())
        place = {"rank": int(place["rank"]), "node": str(place["node"]), "device": str(place["device"])}
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is damaged (%s): rank %d is left out of the timing comparison", where, e, rank)
        return None
    rows, bad = [], 0
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                rows.append({k: float(r[k]) for k in COLUMNS})
            except (ValueError, KeyError, TypeError):
                bad += 1
    if bad:
        log.warning("%s: %d row(s) cut short or damaged, left out", path, bad)
    return place, rows


def judge_files(run_dir: Path, world: int, settings: TimingSection) -> dict[str, Any] | None:
    """Rank 0, after the script: every rank's medians and, window by window, the straggler episodes."""
    ranks = [r for r in (read_rank(run_dir, k) for k in range(world)) if r is not None]
    if not ranks:
        return None
    keys = ("wall", *PHASES, "cpu", "queue")
    medians = [
        {"rank": w["rank"], "steps": len(rows), **{k: statistics.median(r[k] for r in rows) for k in keys}}
        for w, rows in ranks
        if rows
    ]
    judge = Judge(settings.ratio, settings.min_share, settings.patience)
    n = settings.window
    common = min(len(rows) for _, rows in ranks)
    windows = 0
    for end in range(n, common + 1, n):  # the windows every rank completed
        stats = [
            WindowStats.of(w["rank"], w["node"], w["device"], rows[end - n : end], {}) for w, rows in ranks
        ]
        windows += len(stats) > 1
        for episode in judge.window(stats, end):
            log.warning("%s", episode.message)
    check = straggler_check(len(ranks), windows, n, settings.patience, len(judge.episodes))
    return {
        "median_s_per_rank": medians,
        "stragglers": [e.as_dict() for e in judge.episodes],
        "straggler_check": check,
        "window": n,
        "measured": "optimizer steps of the script (see README: what run can measure)",
    }
