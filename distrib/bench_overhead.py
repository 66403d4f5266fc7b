"""``launch.py bench overhead``: per-step time of our training loop vs a bare DDP loop.

Both loops run in the same 2 gloo ranks under one torchrun launch, with the same model
(small_cnn), the same in-memory uint8 data (no data loading on either side), the same
batch and optimizer. "ours" is the engine's real ``train_epoch`` (normalisation,
autocast/no_sync contexts, gradient-norm check, metric sums, step logging); "bare" is the
loop a person writes by hand. They alternate in blocks of STEPS steps for ROUNDS rounds
(after a warm-up round), so machine noise hits both alike; the ratio of the medians of
all per-step times is the overhead.

Run as a script by torchrun: ``python distrib/bench_overhead.py ROUNDS STEPS BATCH OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _data(n: int, size: int, classes: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
    )


def bare_block(
    model: Any, opt: Any, data: tuple, rank: int, world: int, steps: int, batch: int
) -> list[float]:
    """The hand-written DDP loop: index, normalise, forward, backward, step."""
    import torch
    from torch import nn

    images, targets = data
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    crit = nn.CrossEntropyLoss()
    stamps = [time.perf_counter()]
    for k in range(steps):
        idx = torch.arange(rank, batch * world, world) + k * batch * world
        x = (images[idx].float() - mean) / std
        loss = crit(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]


@dataclass
class _MemorySampler:
    def skip_once(self, items: int) -> None:
        pass

    def set_epoch(self, epoch: int) -> None:
        pass


class MemoryLoader:
    """The engine's loader interface over in-memory batches (the same ones bare sees)."""

    def __init__(self, data: tuple, rank: int, world: int, steps: int, batch: int):
        self.images, self.targets = data
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


def our_block(ctx: Any, cfg: Any, eng: Any, steps: int) -> list[float]:
    """The engine's own ``train_epoch`` over one block, timing every optimizer step."""
    from distrib import train as engine

    stamps: list[float] = []

    class Timed(engine.StepLog):
        def step(self, prog: engine.Progress, *sums: object) -> None:
            stamps.append(time.perf_counter())
            super().step(prog, *sums)  # type: ignore[arg-type]

    log_to = Timed(ctx, cfg, Path(tempfile.gettempdir()), eng, steps)  # log_every is huge: never writes
    stamps.append(time.perf_counter())
    engine.train_epoch(ctx, cfg, eng, engine.Progress(), log_to, None, (), [])  # type: ignore[arg-type]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]


def worker(argv: list[str]) -> int:
    """Both loops in the same two processes, in alternating blocks (paired timing)."""
    import torch

    from distrib import train as engine
    from distrib.config import load_config
    from distrib.context import DistContext
    from distrib.models import SmallCNN
    from distrib.process_group import process_group

    rounds, steps, batch, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
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
    times: dict[str, list[float]] = {"bare_ddp": [], "launch_py": []}
    with process_group(ctx, 120):
        data = _data(batch * ctx.world_size * steps, 32)
        loader = MemoryLoader(data, ctx.rank, ctx.world_size, steps, batch)
        eng = engine.assemble(ctx, cfg, 4, loader, loader, MEAN, STD)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(SmallCNN(4, 16, True))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for r in range(rounds + 1):  # round 0 warms both up and is not kept
            for name in ("bare_ddp", "launch_py") if r % 2 else ("launch_py", "bare_ddp"):
                if name == "bare_ddp":
                    t = bare_block(model, opt, data, ctx.rank, ctx.world_size, steps, batch)
                else:
                    t = our_block(ctx, cfg, eng, steps)
                if r:
                    times[name] += t
        del eng, model, opt  # DDP reducers must go before their process group
    if ctx.is_main:
        Path(out).write_text(json.dumps(times))
    return 0


def launch_once(rounds: int, steps: int, batch: int, scratch: Path) -> dict[str, list[float]]:
    """One torchrun launch of 2 gloo ranks running both loops; rank 0's step times."""
    from distrib.bench import torchrun_cmd
    from distrib.errors import LaunchError

    out = scratch / "times.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    args = [str(rounds), str(steps), str(batch), str(out)]
    cmd = [*torchrun_cmd(), "--standalone", "--nproc_per_node", "2", __file__, *args]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise LaunchError(f"overhead benchmark failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def main_bench_overhead(args: argparse.Namespace, out: Path) -> int:
    """``launch.py bench overhead``: --repeats rounds of --steps steps per loop, --batch per rank."""
    from distrib.bench import markdown_table, summarise, write_results

    with tempfile.TemporaryDirectory() as tmp:
        times = launch_once(args.repeats, args.steps, args.batch, Path(tmp))
    rows = summarise(times, "bare_ddp")
    ratio = float(rows[1]["ratio_vs_bare_ddp"])  # type: ignore[arg-type]
    meta = {
        "what": "overhead",
        "ranks": 2,
        "steps_per_block": args.steps,
        "batch_per_rank": args.batch,
        "rounds": args.repeats,
        "unit": "seconds per optimizer step (every step of every round)",
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
