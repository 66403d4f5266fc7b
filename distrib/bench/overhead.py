"""``launch.py bench overhead``: step time of the engine's loop against a bare DDP loop.

Both loops run in the same 2 gloo ranks under one torchrun launch, with the same model
(small_cnn), the same in-memory uint8 batches (no data loading on either side), the same
batch size and optimizer. "launch_py" is the engine's real ``train_epoch`` (normalisation,
autocast/no_sync contexts, gradient-norm check, metric sums, hooks); "bare_ddp" is the
step a person writes by hand (index, normalise, forward, backward, step) on its own DDP
copy of the model.

How it judges 1%: the two alternate step by step. A hook of the engine's loop runs the
bare steps between engine steps (ABBA order), so every engine step has a bare twin
measured a moment before or after it on the same batch, under the same machine load; the
overhead is the 20%-trimmed mean of the per-pair log ratios, with a bootstrap 95%
interval (bench/toolkit.py). (Blocks of steps alternating in
ABBA order still left +-5% between runs on a shared 2-core host: a block's median step
drifts 65-88 ms with the neighbours' load.)

Run as a script by torchrun (the repository on PYTHONPATH):
``python distrib/bench/overhead.py ROUNDS STEPS BATCH SIZE OUT``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.bench.toolkit import REPO, markdown_table, paired_ratio, run_checked, torchrun_cmd, write_results
from distrib.engine.state import Hook, Run
from distrib.memory.monitor import Monitor, Where

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASSES = ("a", "b", "c", "d")
WIDTH = 16
POOL = 8  # distinct batches per rank, cycled: the data need not grow with the step count
WARMUP = 5  # first pairs of the first round, not kept (allocator, caches, DDP buckets)
VARIANTS = ("bare_ddp", "launch_py")
WINDOW = 20  # timing.window's default: the breakdown's gather once per this many steps


@dataclass(frozen=True)
class Shape:
    """One round's work: ``steps`` steps of ``batch`` images of ``size`` px per rank."""

    steps: int
    batch: int
    size: int
    rank: int
    world: int

    def index(self, k: int) -> Any:
        """Step ``k``'s sample indices on this rank: disjoint across ranks, as a sampler would."""
        import torch

        return (
            torch.arange(self.rank, self.batch * self.world, self.world)
            + (k % POOL) * self.batch * self.world
        )


def make_data(shape: Shape) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = shape.batch * shape.world * POOL
    return (
        torch.randint(0, 256, (n, 3, shape.size, shape.size), dtype=torch.uint8, generator=g),
        torch.randint(0, len(CLASSES), (n,), generator=g),
    )


class _NoSkip:
    def start_at(self, samples: int) -> None:
        """In-memory batches are never resumed mid-epoch."""


@dataclass(frozen=True)
class _Batching:
    batch_size: int


class MemoryLoader:
    """The engine's loader interface over in-memory batches (the same ones bare sees)."""

    def __init__(self, data: tuple, shape: Shape):
        self.images, self.targets = data
        self.shape = shape
        self.sampler = _NoSkip()
        self.loader = _Batching(shape.batch)

    def __len__(self) -> int:
        return self.shape.steps

    def epoch(self, epoch: int) -> Iterator:
        from datasets.collate import Batch

        for k in range(self.shape.steps):
            idx = self.shape.index(k)
            yield Batch(self.images[idx], self.targets[idx], idx)


class BareStep:
    """The hand-written DDP step, on its own model and optimizer."""

    def __init__(self, data: tuple, shape: Shape):
        import torch
        from torch import nn

        from distrib.engine.models import SmallCNN

        torch.manual_seed(0)
        self.model = nn.parallel.DistributedDataParallel(SmallCNN(len(CLASSES), WIDTH, True))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD).view(1, 3, 1, 1) * 255
        self.crit = nn.CrossEntropyLoss()
        self.data, self.shape = data, shape

    def __call__(self, k: int) -> None:
        images, targets = self.data
        idx = self.shape.index(k)
        x = (images[idx].float() - self.mean) / self.std
        loss = self.crit(self.model(x), targets[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class Interleave(Hook):
    """Times each engine step and a bare twin on the same batch, in ABBA order.

    After odd engine steps the hook runs two bare steps (this step's twin, then the next
    step's), after even ones none: engine, bare, bare, engine, engine, bare, ... so being
    first or second in a pair (a warm or cold cache, a scheduler tick) favours neither.
    With a memory monitor, it also records half of the engine steps (steps 1, 2 of every
    4: ABBA again) and charges its work to those steps, so on and off sit side by side.
    """

    def __init__(self, bare: BareStep, monitor: Monitor | None = None):
        self.bare, self.monitor = bare, monitor
        self.times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        self.monitor_on: list[bool] = []
        self.in_monitor: list[float] = []  # seconds inside the monitor's step hook
        self.mark = 0.0

    def start_epoch(self, run: Run) -> None:
        self.mark = time.perf_counter()

    def after_step(self, run: Run) -> None:
        k = run.prog.samples_in_epoch // run.eng.global_batch - 1  # this epoch's step
        on = self.monitor is not None and k % 4 in (1, 2)
        if on:
            start = time.perf_counter()
            self.monitor.on_step(run.prog.global_step)  # type: ignore[union-attr]
            self.in_monitor.append(time.perf_counter() - start)
        done = time.perf_counter()
        self.times["launch_py"].append(done - self.mark)
        self.monitor_on.append(on)
        self.mark = done
        if k % 2 == 0:
            for twin in (k, k + 1) if k + 1 < self.bare.shape.steps else (k,):
                start = time.perf_counter()
                self.bare(twin)
                self.mark = time.perf_counter()
                self.times["bare_ddp"].append(self.mark - start)


def build(ctx: Any, shape: Shape, run_dir: Path) -> tuple[Run, Interleave, Monitor]:
    """The engine's run (its real loop and step) with the bare step and a memory monitor hooked in."""
    from datasets.ledger import Ledger
    from distrib.config import MemorySection, load_config
    from distrib.engine.step import Feed, assemble
    from distrib.signals import StopRequest
    from distrib.timing.clock import StepClock
    from distrib.timing.watch import TimingHook

    cfg = load_config(None, [f"model.width={WIDTH}", "optim.lr=0.01", "optim.schedule=constant"])
    data = make_data(shape)
    loader = MemoryLoader(data, shape)
    feed = Feed(loader, loader, MEAN, STD, CLASSES)
    # a stop request, as train has: its per-step all-reduce is part of the engine step timed
    run = Run(ctx, cfg, assemble(ctx, cfg, feed), stop=StopRequest())
    run.ledger = Ledger(len(data[1]))  # train's sample ledger: its per-batch count is in the engine step
    run.clock = StepClock(run.eng.model, comm_hooks=ctx.distributed, cuda=False)  # train's step breakdown
    run.hooks.append(TimingHook(ctx, cfg.timing, run.clock, run_dir))
    where = Where(ctx.rank, ctx.world_size, ctx.device, None, run_dir)
    monitor = Monitor(where, MemorySection(), agree=lambda mine: mine).start()
    pairs = Interleave(BareStep(data, shape), monitor)
    run.hooks.append(pairs)
    return run, pairs, monitor


def worker(argv: list[str]) -> int:
    """Rounds of one epoch each: every engine step followed by its bare twin."""
    from distrib.context import DistContext
    from distrib.engine.state import Progress
    from distrib.engine.train import train_epoch
    from distrib.process_group import process_group

    rounds, steps, batch, size, out = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    ctx = DistContext.from_env(os.environ)
    kept: dict[str, list[Any]] = {v: [] for v in (*VARIANTS, "monitor_on")}
    with process_group(ctx, 120), tempfile.TemporaryDirectory() as scratch:
        run, pairs, monitor = build(ctx, Shape(steps, batch, size, ctx.rank, ctx.world_size), Path(scratch))
        gc.collect()
        gc.disable()  # a collection landing in one loop's step is noise, not overhead
        for r in range(rounds):
            run.prog = Progress()
            train_epoch(run)
            skip = WARMUP if r == 0 else 1  # a round's first step also starts its iterator
            for v in VARIANTS:
                kept[v] += pairs.times[v][skip:]
                pairs.times[v] = []
            kept["monitor_on"] += pairs.monitor_on[skip:]
            pairs.monitor_on = []
        gc.enable()
        kept["sampler_ms"] = [sampler_cost(monitor) * 1000]
        kept["ledger_s"] = ledger_cost(ctx, run, steps)
        kept["timing_s"] = timing_cost(run)
        kept["in_monitor"] = pairs.in_monitor
        monitor.finish()
        del run, pairs  # DDP reducers must go before their process group
    if ctx.is_main:
        Path(out).write_text(json.dumps(kept))
    return 0


def ledger_cost(ctx: Any, run: Run, steps: int) -> list[float]:
    """[seconds per micro-batch count, seconds per epoch-end check] of the sample ledger.

    The count runs inside every engine step (and so inside ``overhead``); the check (an all-reduce
    of N counts and a comparison) once per epoch: its share of a step is check / steps per epoch.
    """
    import torch

    from datasets.ledger import check

    assert run.ledger is not None
    idx = run.eng.feed.train.shape.index(0)
    start = time.perf_counter()
    for _ in range(200):
        run.ledger.add(idx)
    add = (time.perf_counter() - start) / 200
    order = torch.arange(run.ledger.counts.numel())
    start = time.perf_counter()
    for _ in range(5):
        check(run.ledger.combined(ctx), order, steps * len(idx) * ctx.world_size, 0)
    return [add, (time.perf_counter() - start) / 5]


def timing_cost(run: Run) -> list[float]:
    """[seconds of the step breakdown's own work per step, seconds of its per-window gather].

    Its per-step work (the clock's marks, the post-accumulate-grad hook left on the parameter
    accumulated last, the row) is timed by repeating it without the step it measures; the window's
    gather and file write (every timing.window steps) by calling the hook at a window's step.
    """
    from distrib.engine.state import Progress

    clock = run.clock
    assert clock is not None
    hooked = [p for p in run.eng.model.parameters() if id(p) in clock._grad_hooks]  # one after step 1
    start = time.perf_counter()
    for k in range(200):
        clock.add("data", 0.0)
        began = clock.begin_forward()
        for p in hooked:
            clock._cpu_grad(p)
        clock.end_backward(began, sync=True)
        with clock.optimizer():
            pass
        clock.end_step(k)
    per_step = (time.perf_counter() - start) / 200
    from distrib.timing.watch import TimingHook

    hook = next(h for h in run.hooks if isinstance(h, TimingHook))
    window, spent = run.cfg.timing.window, 0.0
    hook.after_step(run)  # the rows above, out of the way
    for k in range(5):
        for step in range(window):
            clock.end_step(step)
        run.prog = Progress(global_step=window * (k + 1))
        start = time.perf_counter()
        hook.after_step(run)  # a window's rows written and its medians gathered on every rank
        spent += time.perf_counter() - start
    return [per_step, spent / 5]


def sampler_cost(monitor: Monitor) -> float:
    """Seconds one background sample takes (it runs throughout, so the pairs cannot see it)."""
    assert monitor.probe is not None
    start = time.perf_counter()
    for _ in range(20):
        monitor.probe.slow()
        monitor.probe.fast()
    return (time.perf_counter() - start) / 20


def monitor_pairs(times: dict[str, list[Any]]) -> tuple[list[float], list[float]]:
    """(on, off) engine/bare ratios of adjacent steps: each 4-step block gives (1, 0) and (2, 3)."""
    rel = [o / b for o, b in zip(times["launch_py"], times["bare_ddp"], strict=True)]
    on = [i for i, flag in enumerate(times["monitor_on"]) if flag]
    off = [i for i, flag in enumerate(times["monitor_on"]) if not flag]
    pairs = list(zip(on, off, strict=False))  # adjacent in ABBA order: (1, 0), (2, 3), (5, 4), ...
    return [rel[a] for a, _ in pairs], [rel[b] for _, b in pairs]


def launch_once(rounds: int, shape: Shape, scratch: Path) -> dict[str, list[float]]:
    """One torchrun launch of 2 gloo ranks running both loops; rank 0's paired step times."""
    out = scratch / "times.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    args = [str(rounds), str(shape.steps), str(shape.batch), str(shape.size), str(out)]
    run_checked([*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", __file__, *args], env)
    return json.loads(out.read_text())


def main(out: Path, rounds: int, steps: int, batch: int, size: int) -> int:
    """``launch.py bench overhead``: ``rounds`` epochs of ``steps`` step pairs, ``batch`` per rank."""
    from distrib.errors import LaunchError

    if rounds < 1 or steps < WARMUP + 2 or batch < 1 or size < 8:
        raise LaunchError(
            f"bench overhead needs --repeats >= 1, --steps >= {WARMUP + 2}, --batch >= 1 and --size >= 8; "
            f"got {rounds}, {steps}, {batch}, {size}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        times = launch_once(rounds, Shape(steps, batch, size, 0, 2), Path(tmp))
    off = [i for i, on in enumerate(times["monitor_on"]) if not on]
    ratio = paired_ratio([times["launch_py"][i] for i in off], [times["bare_ddp"][i] for i in off])
    mon = paired_ratio(*monitor_pairs(times))
    sample_ms = times["sampler_ms"][0]
    step_s = statistics.median(times["bare_ddp"])
    direct = (
        statistics.median(times["in_monitor"]) + sample_ms / 1000 * step_s
    ) / step_s  # hook + 1 Hz sampler
    rows = [
        {"variant": v, "steps": len(times[v]), "median_step_s": statistics.median(times[v]),
         "p10_s": quantile(times[v], 0.1), "p90_s": quantile(times[v], 0.9)}
        for v in VARIANTS
    ]  # fmt: skip
    meta = {
        "what": "overhead", "ranks": 2, "rounds": rounds, "steps_per_round": steps, "batch_per_rank": batch,
        "image_size": size, "model": f"small_cnn width {WIDTH}", "unit": "seconds per optimizer step",
        "pairing": "each engine step beside a bare step on the same batch; monitor on/off on adjacent steps",
        "overhead": ratio.ratio - 1, "overhead_ci95": [ratio.low - 1, ratio.high - 1], "pairs": ratio.pairs,
        "monitor_overhead": mon.ratio - 1, "monitor_overhead_ci95": [mon.low - 1, mon.high - 1],
        "monitor_pairs": mon.pairs, "sampler_ms_per_sample": sample_ms,
        "monitor_in_step_us": 1e6 * statistics.median(times["in_monitor"]), "monitor_overhead_direct": direct,
    }  # fmt: skip
    add_s, check_s = times["ledger_s"]
    meta["ledger_share"] = (add_s + check_s / steps) / step_s  # per step: a count, 1/steps of a check
    meta["ledger_count_us"], meta["ledger_check_ms"] = 1e6 * add_s, 1e3 * check_s
    clock_s, window_s = times["timing_s"]
    meta["timing_share"] = (clock_s + window_s / WINDOW) / step_s  # per step: the clock, 1/window of a gather
    meta["timing_clock_us"], meta["timing_window_ms"] = 1e6 * clock_s, 1e3 * window_s
    write_results(out, rows, {v: times[v] for v in VARIANTS}, meta)
    sys.stdout.write(
        markdown_table(rows) + f"\nper-step overhead of the engine: {ratio.as_percent()} "
        "(target <= 2%; the step breakdown on, the stop vote kept)"
        f"\nper-step overhead of the memory monitor: {100 * direct:.2f}% measured inside the step "
        f"({meta['monitor_in_step_us']:.0f} us in its hook per step, plus its 1 Hz background sample of "
        f"{sample_ms:.2f} ms), {mon.as_percent()} side by side (monitor on vs off, adjacent steps); "
        f"target <= 1%\nthe sample ledger: {100 * meta['ledger_share']:.3f}% of a step "
        f"({meta['ledger_count_us']:.1f} us to count a batch, {meta['ledger_check_ms']:.2f} ms per epoch-end "
        f"check over {steps} steps); target <= 0.5%\nthe step breakdown: {100 * meta['timing_share']:.3f}% "
        f"of a step ({meta['timing_clock_us']:.1f} us of clock work per step, {meta['timing_window_ms']:.2f} "
        f"ms per window of {WINDOW} steps to write and gather); target <= 0.5%\nresults in {out}\n"
    )
    return 0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
