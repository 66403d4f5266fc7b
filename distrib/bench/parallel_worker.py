"""``bench parallel``'s worker: one mode on one rank (engine, memory monitor, timed steps).

Run as a script by torchrun, one launch per mode (the repository on PYTHONPATH):
``python distrib/bench/parallel_worker.py SPEC_JSON OUT_JSON``; the launcher side, which
plans the modes and compares them, is distrib/bench/parallel.py.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrib.engine.state import Hook, Run

LOSS_STEPS = 5  # the first losses compared with single's
CLASSES = 10


@dataclass(frozen=True)
class Spec:
    """What every mode runs: model, batches, precision, steps (one JSON for every worker)."""

    mode: str
    world: int  # processes for this mode
    devices: int  # devices the global batch is spread over (dp: GPUs in one process)
    model: str
    global_batch: int  # the same for every mode: batch per device x the devices of the widest mode
    image_size: int
    steps: int
    warmup: int
    amp: str
    seed: int = 0
    run_dir: str = ""
    config: str = ""  # a training config whose data to use instead of synthetic batches


# --------------------------------------------------------------------------- in the worker


class GlobalBatches:
    """The same global batches for every mode; each rank takes its stride, as the sampler does."""

    def __init__(self, spec: Spec, rank: int, world: int):
        import torch

        self.spec, self.rank, self.world = spec, rank, world
        g = torch.Generator().manual_seed(spec.seed)
        n, s = spec.global_batch, spec.image_size
        pool = 4  # distinct global batches, cycled
        self.images = torch.randint(0, 256, (pool, n, 3, s, s), dtype=torch.uint8, generator=g)
        self.targets = torch.randint(0, CLASSES, (pool, n), generator=g)
        self.index = torch.arange(n)
        self.sampler = _NoSkip()
        self.loader = _Batching(n // world)
        self.steps = spec.warmup + spec.steps
        self.waits: list[float] = []  # seconds the loop waited for each batch

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[Any]:
        from datasets.collate import Batch

        for k in range(self.steps):
            start = time.perf_counter()
            idx = slice(self.rank, None, self.world)
            batch = Batch(self.images[k % 4][idx], self.targets[k % 4][idx], self.index[idx])
            self.waits.append(time.perf_counter() - start)
            yield batch


class _NoSkip:
    def start_at(self, samples: int) -> None:
        """In-memory batches are never resumed mid-epoch."""


@dataclass(frozen=True)
class _Batching:
    batch_size: int


class StepRecorder(Hook):
    """Per optimizer step: seconds (device synchronised) and this rank's loss sum and count."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: list[float] = []
        self.losses: list[tuple[float, int]] = []
        self.mark = 0.0
        self.prev = (0.0, 0)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start_epoch(self, run: Run) -> None:
        self.mark, self.prev = self._now(), (0.0, 0)

    def after_step(self, run: Run) -> None:
        now = self._now()
        self.seconds.append(now - self.mark)
        self.mark = now
        assert run.sums is not None
        total, count = run.sums.loss.item(), run.sums.count
        self.losses.append((total - self.prev[0], count - self.prev[1]))
        self.prev = (total, count)


def engine_for(ctx: Any, spec: Spec, feed_train: Any) -> Any:
    """The engine ``train`` would build for this mode (the same init on every rank and mode)."""
    from distrib.config import load_config
    from distrib.engine.step import Feed, assemble

    sets = [f"model.name={spec.model}", "optim.lr=0.01", "optim.schedule=constant", f"train.amp={spec.amp}",
            f"run.seed={spec.seed}", "model.batchnorm=false", "model.width=32"]  # fmt: skip
    cfg = load_config(None, sets)
    mode = "none" if spec.mode == "single" else spec.mode
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode=mode))
    feed = Feed(
        feed_train, feed_train, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(str(c) for c in range(CLASSES))
    )
    return cfg, assemble(ctx, cfg, feed)


def epochs(run: Run, recorder: StepRecorder, steps: int) -> None:
    """Train from step 0 until ``steps`` steps were recorded (real data may need several epochs)."""
    from distrib.engine.state import Progress
    from distrib.engine.train import train_epoch

    run.prog = Progress()
    recorder.seconds, recorder.losses = [], []
    while len(recorder.seconds) < steps:
        train_epoch(run)
        run.prog.epoch += 1
        run.prog.samples_in_epoch, run.prog.epoch_sums = 0, [0.0, 0.0, 0.0]


def measure(run: Run, recorder: StepRecorder, spec: Spec, batches: Any) -> dict[str, Any]:
    """The timed steps (warm-up dropped) and, for ddp, the same steps without all-reduce."""
    total = spec.warmup + spec.steps
    epochs(run, recorder, total)
    out = {"seconds": recorder.seconds[spec.warmup :], "losses": recorder.losses[:LOSS_STEPS]}
    out["data_wait"] = sum(batches.waits[spec.warmup : total])
    if spec.mode == "ddp":
        with run.eng.model.no_sync():  # the same steps, gradients never averaged: no communication
            epochs(run, recorder, total)
        out["seconds_no_sync"] = recorder.seconds[spec.warmup :]
    return out


class TimedLoader:
    """A training loader whose waits for the next batch are counted (the data-wait share)."""

    def __init__(self, inner: Any):
        self.inner, self.sampler, self.loader = inner, inner.sampler, inner.loader
        self.waits: list[float] = []

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int) -> Iterator[Any]:
        it = iter(self.inner.epoch(epoch))
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def config_engine(ctx: Any, spec: Spec) -> tuple[Any, Any, TimedLoader]:
    """The engine on a training config's own data, batches split as the global batch requires."""
    from datasets.build import build_split
    from distrib.config import load_config
    from distrib.engine.step import assemble
    from distrib.engine.train import build_feed

    mode = "none" if spec.mode == "single" else spec.mode
    sets = [
        f"data.batch_size={spec.global_batch // spec.world}",
        f"train.amp={spec.amp}",
        f"train.max_steps={spec.warmup + spec.steps}",
        "train.epochs=1000000",
    ]
    cfg = load_config(spec.config, sets)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode=mode))  # fsdp: bench only
    feed = build_feed(ctx, cfg, build_split(ctx, cfg))
    timed = TimedLoader(feed.train)
    feed = dataclasses.replace(feed, train=timed)
    return cfg, assemble(ctx, cfg, feed), timed


class HandLoop(Hook):
    """What a person writes to time one device (the same init and batches, no engine), one of its
    steps run right after each engine step, so both see the same machine load."""

    def __init__(self, ctx: Any, spec: Spec, batches: GlobalBatches, recorder: StepRecorder):
        import torch

        from distrib.engine.models import SmallCNN
        from distrib.seeding import INIT, derive_seed, seed_process

        with torch.random.fork_rng(devices=[]):
            seed_process(derive_seed(spec.seed, INIT))
            self.model = SmallCNN(CLASSES, 32, False).to(ctx.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.mean = torch.tensor([0.5] * 3, device=ctx.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.25] * 3, device=ctx.device).view(1, 3, 1, 1) * 255
        self.ctx, self.batches, self.recorder = ctx, batches, recorder
        self.seconds: list[float] = []

    def after_step(self, run: Run) -> None:
        import torch
        from torch import nn

        k = run.prog.samples_in_epoch // run.eng.global_batch - 1  # this epoch's step
        start = time.perf_counter()
        x = (self.batches.images[k % 4].to(self.ctx.device).float() - self.mean) / self.std
        loss = nn.functional.cross_entropy(self.model(x), self.batches.targets[k % 4].to(self.ctx.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ctx.is_cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        self.recorder.mark = time.perf_counter()  # the engine's next step starts now


def worker(spec_path: str, out_path: str) -> int:
    """One mode on this rank: engine, monitor, timed steps; rank 0 writes every rank's results."""
    from distrib.context import DistContext
    from distrib.engine.train import MemoryHook
    from distrib.memory.monitor import Monitor, Where
    from distrib.memory.preflight import cuda_index
    from distrib.process_group import barrier, gather_objects, process_group

    spec = Spec(**json.loads(Path(spec_path).read_text()))
    ctx = DistContext.from_env(os.environ, cuda_device_count=_cuda_count())
    with process_group(ctx, 300):
        if spec.config:
            cfg, eng, batches = config_engine(ctx, spec)
        else:
            batches = GlobalBatches(spec, ctx.rank, ctx.world_size)
            cfg, eng = engine_for(ctx, spec, batches)
        recorder = StepRecorder(ctx.is_cuda)
        where = Where(ctx.rank, ctx.world_size, ctx.device, cuda_index(ctx), Path(spec.run_dir))
        monitor = Monitor(where, cfg.memory, agree=lambda mine: mine).start()
        hand = HandLoop(ctx, spec, batches, recorder) if spec.mode == "single" and not spec.config else None
        run = Run(ctx, cfg, eng, hooks=[recorder, MemoryHook(monitor), *([hand] if hand else [])])
        result = measure(run, recorder, spec, batches)
        if hand is not None:
            result["hand_seconds"] = hand.seconds[spec.warmup :]
        monitor.finish()
        result["memory"] = monitor.report()["peak"] | {"device": ctx.device}
        every = gather_objects(ctx, result)
        # FSDP2 on gloo: destroying the group while its modules and hooks are alive aborts one rank
        # now and then ("terminate called without an active exception"); release them everywhere first
        del run, eng, hand, monitor, recorder
        gc.collect()
        barrier(ctx)
    if ctx.is_main:
        Path(out_path).write_text(json.dumps(every))
    return 0


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
