"""Run under torchrun by test_data.py: the decoded cache on a real gloo group.

argv: IMAGEFOLDER_ROOT CACHE_DIR RESULT_JSON. Every rank compares its batches with the cache
on and off for 0 and 2 workers over two epochs (epoch 0 fills, epoch 1 reads); rank 0 writes
what it found and the test asserts.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from datasets.cache import CachedSource, open_cache
from datasets.folder import scan_imagefolder
from datasets.loader import LoaderSpec, build_loader
from datasets.transforms import Decoder, train_transform
from distrib.config import load_config
from distrib.context import DistContext
from distrib.process_group import gather_objects, process_group


def main() -> int:
    root, cache_dir, result_path = sys.argv[1:4]
    ctx = DistContext.from_env(os.environ)
    data = load_config(None, ["data.resize=[16, 16]", "data.crop=[12, 12]", "data.vflip=0.5"]).data
    with process_group(ctx, timeout_s=60):
        samples = scan_imagefolder(root)
        cache = open_cache(ctx, [samples], cache_dir, Decoder.from_config(data))
        source = CachedSource(cache, cache.slots(samples))
        same, seen, first = True, [], []
        for workers in (2, 0):
            spec = LoaderSpec(
                seed=3, batch_size=4, num_workers=workers, train=True, decoder=cache.plan.decoder
            )
            for epoch in (0, 1):
                on = list(build_loader(samples, train_transform(data), ctx, spec, source).epoch(epoch))
                off = list(build_loader(samples, train_transform(data), ctx, spec).epoch(epoch))
                same &= len(on) == len(off) and all(
                    torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
                    for a, b in zip(on, off, strict=True)
                )
                seen += [i for b in on for i in b.indices.tolist()]
                first = first or sorted(seen)  # epoch 0 with workers: this rank's shard
        found = gather_objects(
            ctx, {"same": same, "first": first, "seen": sorted(set(seen)), "folder": str(cache.plan.folder)}
        )
        if ctx.is_main:
            folders = sorted(os.listdir(cache_dir))
            result = {"ranks": found, "folders": folders, "filled": cache.filled(), "count": len(samples)}
            with open(result_path, "w") as fh:
                json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
