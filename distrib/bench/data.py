"""``launch.py bench data``: the data pipeline against the common recipe and the floor.

Same images, same workers, same batch, same run, alternating order, medians:
  (a) recipe: torchvision ImageFolder + PIL Resize((S, S)) + random flips + ToTensor + Normalize
  (b) ours:   uint8 decode + the same resize/flips on uint8 in workers, uint8 collate,
              normalisation after the copy to the device (the main process on CPU)
  (c) floor:  the same workers only decode to uint8 and collate
and for statistics: exact histograms (ours) against the mean-of-per-image-std loop.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets.folder import scan_imagefolder
from datasets.loader import LoaderSpec, build_loader
from datasets.stats import compute_stats
from datasets.transforms import Normalizer, decode_uint8, train_transform
from distrib.bench.toolkit import markdown_table, run_rounds, write_results
from distrib.config import load_config
from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def recipe_batches(root: str, size: int, batch: int, workers: int, device: torch.device) -> Iterable:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize((size, size)),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        tvd.ImageFolder(root, transform=tf),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    for x, _ in loader:
        yield x.to(device, non_blocking=True)


def ours_batches(root: str, size: int, batch: int, workers: int, device: torch.device) -> Iterable:
    cfg = load_config(None, [f"data.resize=[{size}, {size}]", "data.hflip=0.5", "data.vflip=0.5"])
    ctx = DistContext(device=str(device))
    loader = build_loader(
        scan_imagefolder(root),
        train_transform(cfg.data),
        ctx,
        LoaderSpec(seed=0, batch_size=batch, num_workers=workers, train=True),
    )
    norm = Normalizer(MEAN, STD, device, reuse=True)  # as the training loop uses it
    for b in loader.epoch(0):
        yield norm(b.images.to(device, non_blocking=True))


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_uint8(self.paths[i])


def floor_batches(root: str, size: int, batch: int, workers: int, device: torch.device) -> Iterable:
    loader = DataLoader(
        _Decode(scan_imagefolder(root).paths.tolist()),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    for x in loader:
        yield x.to(device, non_blocking=True)


def images_per_s(make: Callable[[], Iterable], device: torch.device) -> float:
    start = time.perf_counter()
    n = 0
    for x in make():
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def naive_stats_seconds(root: str, workers: int) -> float:
    """The usual routine: ToTensor, then average each image's mean and std."""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    start = time.perf_counter()
    loader = DataLoader(tvd.ImageFolder(root, transform=T.ToTensor()), batch_size=1, num_workers=workers)
    mean = torch.zeros(3)
    std = torch.zeros(3)
    for x, _ in loader:
        mean += x.mean(dim=(2, 3)).sum(0)
        std += x.std(dim=(2, 3)).sum(0)
    return time.perf_counter() - start


def exact_stats_seconds(root: str, workers: int) -> float:
    start = time.perf_counter()
    compute_stats(scan_imagefolder(root).paths.tolist(), DistContext(), num_workers=workers)
    return time.perf_counter() - start


def main(out: Path, data: str | None, repeats: int, workers: int, batch: int, size: int) -> int:
    """``launch.py bench data``: throughput of the three loaders, and both stats routines."""
    if not data:
        raise LaunchError(
            "bench data needs --data IMAGEFOLDER_ROOT, e.g. from ../shared/bench/"
            "make_imagefolder.py OUT --imagefolder (then --data OUT/imagefolder)"
        )
    dev = _device()
    n = len(scan_imagefolder(data))
    shape = (size, batch, workers, dev)
    loaders = {
        "a_recipe": lambda: images_per_s(lambda: recipe_batches(data, *shape), dev),
        "b_ours": lambda: images_per_s(lambda: ours_batches(data, *shape), dev),
        "c_floor": lambda: images_per_s(lambda: floor_batches(data, *shape), dev),
    }
    tput = run_rounds(loaders, repeats)
    stats = run_rounds(
        {
            "naive_stats_s": lambda: naive_stats_seconds(data, workers),
            "exact_stats_s": lambda: exact_stats_seconds(data, workers),
        },
        repeats,
    )
    every = {**tput, **stats}
    med = {k: statistics.median(v) for k, v in every.items()}
    rows = [
        {"variant": k, "runs": len(v), "median": med[k], "min": min(v), "max": max(v)}
        for k, v in every.items()
    ]
    ratios = {
        "ours_vs_recipe": med["b_ours"] / med["a_recipe"],
        "ours_vs_floor": med["b_ours"] / med["c_floor"],
        "stats_speedup": med["naive_stats_s"] / med["exact_stats_s"],
    }
    meta = {
        "what": "data", "images": n, "device": str(dev), "workers": workers, "batch": batch, "size": size,
        "repeats": repeats, "cpu_count": os.cpu_count(), "ratios": ratios,
        "units": "loaders: images/s; stats: seconds",
    }  # fmt: skip
    write_results(out, rows, every, meta)
    sys.stdout.write(markdown_table(rows) + "\n" + json.dumps(ratios) + f"\nresults in {out}\n")
    return 0
