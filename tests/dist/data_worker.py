"""Run under torchrun by test_data.py: data-pipeline properties on a real gloo group.

argv: IMAGEFOLDER_ROOT RESULT_JSON. Rank 0 writes what it found; the test asserts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from datasets.folder import Samples, scan_imagefolder, stratified_split
from datasets.loader import LoaderSpec, build_loader
from datasets.samplers import TrainSampler
from datasets.stats import compute_stats
from datasets.transforms import eval_transform
from distrib.config import load_config
from distrib.context import DistContext
from distrib.process_group import all_reduce_sum, gather_objects, process_group


def predict(images: torch.Tensor) -> torch.Tensor:
    """A fixed 'model': class = brightest channel (deterministic, data-dependent)."""
    return images.float().mean(dim=(2, 3)).argmax(dim=1)


def evaluate(samples: Samples, ctx: DistContext) -> tuple[int, int]:
    cfg = load_config(None, ["data.resize=[16, 16]"])  # the images differ in size
    loader = build_loader(
        samples, eval_transform(cfg.data), ctx, LoaderSpec(seed=0, batch_size=4, num_workers=2, train=False)
    )
    counts = torch.zeros(2, dtype=torch.int64)
    seen = []
    for batch in loader.epoch(0):
        counts[0] += (predict(batch.images) == batch.targets).sum()
        counts[1] += len(batch)
        seen += batch.indices.tolist()
    all_reduce_sum(ctx, counts)
    every = sorted(i for part in gather_objects(ctx, seen) for i in part)
    assert every == list(range(len(samples))), "each sample exactly once"
    return int(counts[0]), int(counts[1])


def shard_steps(n: int, ctx: DistContext, batch: int) -> list[list[int]]:
    s = TrainSampler(n, ctx, seed=11)
    s.set_epoch(1)
    idx = [i for i, _ in s]
    return [idx[k : k + batch] for k in range(0, len(idx), batch)]


def main() -> int:
    root, result_path = sys.argv[1], sys.argv[2]
    ctx = DistContext.from_env(os.environ)
    with process_group(ctx, timeout_s=60):
        full = scan_imagefolder(root)
        tr, va = stratified_split(full.targets, 0.3, seed=5)
        split_hash = hashlib.sha1(tr.tobytes() + va.tobytes()).hexdigest()
        hashes = gather_objects(ctx, split_hash)
        correct, total = evaluate(full, ctx)
        stats = {w: compute_stats(full.paths.tolist(), ctx, num_workers=w) for w in (0, 2)}
        steps = gather_objects(ctx, shard_steps(len(full), ctx, batch=3))
        if ctx.is_main:
            alone = evaluate(full, DistContext())
            one_rank = shard_steps(len(full), DistContext(), batch=6)
            result = {
                "world": ctx.world_size,
                "split_hashes": hashes,
                "eval": [correct, total],
                "eval_alone": list(alone),
                "stats": {w: [list(s.mean), list(s.std), s.images] for w, s in stats.items()},
                "steps": steps,
                "one_rank_steps": one_rank,
            }
            with open(result_path, "w") as fh:
                json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
