"""``launch.py bench overhead``: per-step time of our training loop vs a bare DDP loop.

Both sides run as 2 gloo ranks under torchrun, with the same model (small_cnn), the same
in-memory uint8 data (so no data loading on either side), the same batch and optimizer.
"ours" is the engine's real ``train_epoch`` (normalisation, autocast/no_sync contexts,
gradient-norm check, metric sums, step logging); "bare" is the loop a person writes by
hand. Launches alternate bare/ours; each reports the median step time after warm-up,
and the ratio of medians is the overhead.

Run as a script by torchrun: ``python distrib/bench_overhead.py bare|ours STEPS BATCH OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WARMUP = 5
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _data(n: int, size: int, classes: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
    )


def bare_loop(steps: int, batch: int) -> list[float]:
    """The hand-written DDP loop: index, normalise, forward, backward, step."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from distrib.models import SmallCNN

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, targets = _data(batch * world * (steps + WARMUP), 32)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(SmallCNN(4, 16, True))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    crit = nn.CrossEntropyLoss()
    stamps = [time.perf_counter()]
    for k in range(steps + WARMUP):
        idx = torch.arange(rank, batch * world, world) + k * batch * world
        x = (images[idx].float() - mean) / std
        loss = crit(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    del model, opt  # DDP's reducer must go before its process group
    dist.destroy_process_group()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP:]


@dataclass
class _MemorySampler:
    def skip_once(self, items: int) -> None:
        pass

    def set_epoch(self, epoch: int) -> None:
        pass


class MemoryLoader:
    """The engine's loader interface over in-memory batches (the same ones bare sees)."""

    def __init__(self, rank: int, world: int, steps: int, batch: int):
        self.images, self.targets = _data(batch * world * steps, 32)
        self.rank, self.world, self.steps, self.batch = rank, world, steps, batch
        self.sampler = _MemorySampler()
        self.loader = argparse.Namespace(batch_size=batch)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator:
        import torch

        from datasets.collate import Batch

        for k in range(self.steps):
            idx = torch.arange(self.rank, self.batch * self.world, self.world) + k * self.batch * self.world
            yield Batch(self.images[idx], self.targets[idx], idx)


def our_loop(steps: int, batch: int) -> list[float]:
    """The engine's ``train_epoch`` on the same data, timing every optimizer step."""
    from distrib import train as engine
    from distrib.config import load_config
    from distrib.context import DistContext
    from distrib.process_group import process_group

    ctx = DistContext.from_env(os.environ)
    cfg = load_config(
        None,
        [
            "model.width=16",
            "optim.lr=0.01",
            "optim.schedule=constant",
            "train.log_every=1000000",
            "checkpoint.every_epoch=false",
        ],
    )
    with process_group(ctx, 120):
        loader = MemoryLoader(ctx.rank, ctx.world_size, steps + WARMUP, batch)
        eng = engine.assemble(ctx, cfg, 4, loader, loader, MEAN, STD)
        stamps: list[float] = []

        class Timed(engine.StepLog):
            def step(self, prog: engine.Progress) -> None:
                stamps.append(time.perf_counter())
                super().step(prog)

        steps_log = Timed(ctx, cfg, Path(tempfile.gettempdir()), eng, steps + WARMUP)  # never writes
        prog = engine.Progress()
        stamps.append(time.perf_counter())
        engine.train_epoch(ctx, cfg, eng, prog, steps_log, None, (), [])  # type: ignore[arg-type]
        del eng, steps_log  # DDP's reducer must go before its process group
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP:]


def worker(argv: list[str]) -> int:
    mode, steps, batch, out = argv[0], int(argv[1]), int(argv[2]), argv[3]
    times = bare_loop(steps, batch) if mode == "bare" else our_loop(steps, batch)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(times))
    return 0


def launch_once(mode: str, steps: int, batch: int, scratch: Path) -> float:
    from distrib.bench import torchrun_cmd
    from distrib.errors import LaunchError

    out = scratch / f"{mode}.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [
        *torchrun_cmd(),
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        mode,
        str(steps),
        str(batch),
        str(out),
    ]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise LaunchError(f"overhead benchmark ({mode}) failed:\n{res.stderr[-3000:]}")
    return statistics.median(json.loads(out.read_text()))


def main_bench_overhead(args: argparse.Namespace, out: Path) -> int:
    from distrib.bench import markdown_table, summarise, write_results

    times: dict[str, list[float]] = {"bare_ddp": [], "launch_py": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = ["bare", "ours"] if i % 2 == 0 else ["ours", "bare"]
            for mode in order:
                t = launch_once(mode, args.steps, args.batch, Path(tmp))
                times["bare_ddp" if mode == "bare" else "launch_py"].append(t)
    rows = summarise(times, "bare_ddp")
    ratio = float(rows[1]["ratio_vs_bare_ddp"])  # type: ignore[arg-type]
    meta = {
        "what": "overhead",
        "ranks": 2,
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "unit": "median seconds per optimizer step",
        "overhead": ratio - 1,
    }
    write_results(out, rows, times, meta)
    sys.stdout.write(
        markdown_table(rows) + f"\nper-step overhead {100 * (ratio - 1):+.1f}% "
        f"(target <= 5%, goal 2%); results in {out}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
