"""``launch.py bench overhead``: step time of the engine's loop against a bare DDP loop.

Both loops run in the same 2 gloo ranks under one torchrun launch, with the same model
(small_cnn), the same in-memory uint8 data (no data loading on either side), the same
batch and optimizer. "launch_py" is the engine's real ``train_epoch`` (normalisation,
autocast/no_sync contexts, gradient-norm check, metric sums, hooks); "bare_ddp" is the
loop a person writes by hand.

How it judges 1%: the loops alternate in short blocks (ABBA order over the rounds, after
a warm-up round), each block's figure is the median of its step times, each round gives
one ratio of adjacent blocks (so the machine's load at that moment cancels), and the
overhead is the median of those ratios with a bootstrap 95% interval.

Run as a script by torchrun (the repository on PYTHONPATH):
``python distrib/bench/overhead.py ROUNDS STEPS BATCH SIZE OUT``.
"""

from __future__ import annotations

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

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASSES = ("a", "b", "c", "d")
WIDTH = 16
VARIANTS = ("bare_ddp", "launch_py")


@dataclass(frozen=True)
class Shape:
    """One block's work: ``steps`` steps of ``batch`` images of ``size`` px per rank."""

    steps: int
    batch: int
    size: int
    rank: int
    world: int

    def index(self, k: int) -> Any:
        """Step ``k``'s sample indices on this rank: disjoint across ranks, as a sampler would."""
        import torch

        return torch.arange(self.rank, self.batch * self.world, self.world) + k * self.batch * self.world


def make_data(shape: Shape) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    n = shape.batch * shape.world * shape.steps
    return (
        torch.randint(0, 256, (n, 3, shape.size, shape.size), dtype=torch.uint8, generator=g),
        torch.randint(0, len(CLASSES), (n,), generator=g),
    )


def bare_block(model: Any, opt: Any, data: tuple, shape: Shape) -> list[float]:
    """The hand-written DDP loop: index, normalise, forward, backward, step."""
    import torch
    from torch import nn

    images, targets = data
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    crit = nn.CrossEntropyLoss()
    stamps = [time.perf_counter()]
    for k in range(shape.steps):
        idx = shape.index(k)
        x = (images[idx].float() - mean) / std
        loss = crit(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


class _NoSkip:
    def skip_once(self, items: int) -> None:
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


class StepTimer(Hook):
    """Stamps the start of the block and the end of every optimizer step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def start_epoch(self, run: Run) -> None:
        self.stamps = [time.perf_counter()]

    def after_step(self, run: Run) -> None:
        self.stamps.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def our_block(run: Run, timer: StepTimer) -> list[float]:
    """The engine's own ``train_epoch`` over one block, timing every optimizer step."""
    from distrib.engine.state import Progress
    from distrib.engine.train import train_epoch

    run.prog = Progress()
    train_epoch(run)
    return timer.durations()


def build(ctx: Any, shape: Shape) -> tuple[Run, StepTimer, Any, Any, tuple]:
    """The engine's run (its real loop and step) and the bare loop's DDP model, same init."""
    import torch

    from distrib.config import load_config
    from distrib.engine.models import SmallCNN
    from distrib.engine.step import Feed, assemble

    sets = [
        f"model.width={WIDTH}",
        "optim.lr=0.01",
        "optim.schedule=constant",
        "checkpoint.every_epoch=false",
    ]
    cfg = load_config(None, sets)
    data = make_data(shape)
    loader = MemoryLoader(data, shape)
    timer = StepTimer()
    run = Run(ctx, cfg, assemble(ctx, cfg, Feed(loader, loader, MEAN, STD, CLASSES)), hooks=[timer])
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(SmallCNN(len(CLASSES), WIDTH, True))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return run, timer, model, opt, data


def worker(argv: list[str]) -> int:
    """Both loops in the same two processes, in alternating blocks (paired timing)."""
    from distrib.context import DistContext
    from distrib.process_group import process_group

    rounds, steps, batch, size, out = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    ctx = DistContext.from_env(os.environ)
    shape = Shape(steps, batch, size, ctx.rank, ctx.world_size)
    blocks: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    with process_group(ctx, 120):
        run, timer, model, opt, data = build(ctx, shape)
        for r in range(rounds + 1):  # round 0 warms both up and is not kept
            for name in VARIANTS if r % 2 else reversed(VARIANTS):
                t = bare_block(model, opt, data, shape) if name == "bare_ddp" else our_block(run, timer)
                if r:
                    blocks[name].append(t[1:])  # the first step also starts the iterator
        del run, model, opt  # DDP reducers must go before their process group
    if ctx.is_main:
        Path(out).write_text(json.dumps(blocks))
    return 0


def launch_once(rounds: int, shape: Shape, scratch: Path) -> dict[str, list[list[float]]]:
    """One torchrun launch of 2 gloo ranks running both loops; rank 0's step times per block."""
    out = scratch / "times.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    args = [str(rounds), str(shape.steps), str(shape.batch), str(shape.size), str(out)]
    run_checked([*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", __file__, *args], env)
    return json.loads(out.read_text())


def main(out: Path, rounds: int, steps: int, batch: int, size: int) -> int:
    """``launch.py bench overhead``: ``rounds`` pairs of blocks of ``steps`` steps, ``batch`` per rank."""
    from distrib.errors import LaunchError

    if rounds < 2 or steps < 3 or batch < 1 or size < 8:
        raise LaunchError(
            f"bench overhead needs --repeats >= 2, --steps >= 3, --batch >= 1 and --size >= 8; "
            f"got {rounds}, {steps}, {batch}, {size}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        blocks = launch_once(rounds, Shape(steps, batch, size, 0, 2), Path(tmp))
    med = {v: [statistics.median(b) for b in blocks[v]] for v in VARIANTS}
    ratio = paired_ratio(med["launch_py"], med["bare_ddp"])
    rows = [
        {"variant": v, "blocks": len(med[v]), "median_step_s": statistics.median(med[v]),
         "min_block_s": min(med[v]), "max_block_s": max(med[v])}
        for v in VARIANTS
    ]  # fmt: skip
    meta = {
        "what": "overhead", "ranks": 2, "rounds": rounds, "steps_per_block": steps, "batch_per_rank": batch,
        "image_size": size, "model": f"small_cnn width {WIDTH}",
        "unit": "seconds per optimizer step; a block's figure is its median step",
        "overhead": ratio.median - 1, "overhead_ci95": [ratio.low - 1, ratio.high - 1], "pairs": ratio.pairs,
    }  # fmt: skip
    write_results(out, rows, {f"{v}_block_median": med[v] for v in VARIANTS}, meta)
    sys.stdout.write(
        markdown_table(rows) + f"\nper-step overhead of the engine: {ratio.as_percent()} "
        f"(target <= 5%); results in {out}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
