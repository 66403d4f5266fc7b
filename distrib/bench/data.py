"""``launch.py bench data``: the data pipeline against the common recipe and the floor.

Same images, same workers, same batch, same run, alternating order, medians:
  (a) recipe: torchvision ImageFolder + PIL Resize((S, S)) + random flips + ToTensor + Normalize
  (b) ours:   uint8 decode + the same resize/flips on uint8 in workers, uint8 collate,
              normalisation after the copy to the device (the main process on CPU); the first
              epoch, which decodes every image
  (c) floor:  the same workers only decode to uint8 (full size) and collate
  (d) ours, an epoch after the first with the decoded cache warm: pixels read, not decoded, and
      (data.cache_read = 'inline', the default) read, flipped and batched in this process
and, when the images are JPEGs, (b) with data.fast_jpeg off (full-size decode, then resize),
and on a GPU (e) ours with data.decode_on = 'cuda' (nvJPEG batches, augmentation on the GPU);
on JPEG data also the decode + resize stage alone, fast vs full, on one core.
For statistics: exact histograms (ours, decoding; and from the warm cache) against the
mean-of-per-image-std loop.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets.cache import CachedSource, DecodedCache, open_cache
from datasets.device_decode import all_jpeg
from datasets.folder import scan_imagefolder
from datasets.loader import LoaderSpec, build_loader
from datasets.stats import compute_stats
from datasets.transforms import Decoder, Normalizer, decode_uint8, train_transform
from distrib.bench.toolkit import markdown_table, run_rounds, write_results
from distrib.config import DataSection, load_config
from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Pipe:
    """What every loader of the benchmark shares: the images, the size, the batch, the workers."""

    root: str
    size: int
    batch: int
    workers: int
    device: torch.device


def recipe_batches(p: Pipe) -> Iterable:
    root, size, batch, workers, device = p.root, p.size, p.batch, p.workers, p.device
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


def ours_config(size: int, fast_jpeg: bool = True) -> DataSection:
    sets = [
        f"data.resize=[{size}, {size}]",
        "data.hflip=0.5",
        "data.vflip=0.5",
        f"data.fast_jpeg={fast_jpeg}",
    ]
    return load_config(None, [s.lower() for s in sets]).data


def ours_batches(
    p: Pipe,
    *,
    fast_jpeg: bool = True,
    cache: DecodedCache | None = None,
    epoch: int = 0,
    on_device: bool = False,
) -> Iterable:
    """The training loader's batches of ``epoch``; from ``cache`` when given (as data.cache = 'disk');
    ``on_device``: JPEG batches decoded on ``p.device`` (as data.decode_on = 'cuda')."""
    batch, workers, device = p.batch, p.workers, p.device
    data = ours_config(p.size, fast_jpeg)
    samples = scan_imagefolder(p.root)
    decoder = Decoder.from_config(data)
    spec = LoaderSpec(seed=0, batch_size=batch, num_workers=workers, train=True, decoder=decoder,
                      decode_on_device=on_device)  # fmt: skip
    source = CachedSource(cache, cache.slots(samples)) if cache else None
    loader = build_loader(samples, train_transform(data), DistContext(device=str(device)), spec, source)
    norm = Normalizer(MEAN, STD, device, reuse=True)  # as the training loop uses it
    for b in loader.epoch(epoch):
        yield norm(b.images.to(device, non_blocking=True))


def warm_cache(p: Pipe, folder: Path) -> DecodedCache:
    """A decoded cache of the images at ``p.size``, filled by one epoch of the training loader."""
    decoder = Decoder.from_config(ours_config(p.size))
    cache = open_cache(DistContext(), [scan_imagefolder(p.root)], folder, decoder)
    for _ in ours_batches(p, cache=cache):
        pass
    return cache


class _Decode(torch.utils.data.Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_uint8(self.paths[i])


def floor_batches(p: Pipe) -> Iterable:
    device = p.device
    loader = DataLoader(
        _Decode(scan_imagefolder(p.root).paths.tolist()),
        batch_size=p.batch,
        shuffle=True,
        num_workers=p.workers,
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


def exact_stats_seconds(root: str, workers: int, cache: DecodedCache | None = None) -> float:
    samples = scan_imagefolder(root)
    source = CachedSource(cache, cache.slots(samples)) if cache else None
    start = time.perf_counter()
    compute_stats(samples.paths.tolist(), DistContext(), num_workers=workers, source=source)
    return time.perf_counter() - start


def decode_ms(root: str, size: int, fast_jpeg: bool, count: int = 48) -> float:
    """Milliseconds per image of the decode + resize stage alone, one core (the first ``count`` files)."""
    decoder = Decoder((size, size), fast_jpeg)
    paths = scan_imagefolder(root).paths[:count].tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for path in paths:
            decoder(path)
        return (time.perf_counter() - start) / len(paths) * 1000
    finally:
        torch.set_num_threads(threads)


def is_jpeg(root: str) -> bool:
    return all_jpeg(scan_imagefolder(root))


def main(out: Path, data: str | None, repeats: int, workers: int, batch: int, size: int) -> int:
    """``launch.py bench data``: throughput of the three loaders, and both stats routines."""
    if not data:
        raise LaunchError(
            "bench data needs --data IMAGEFOLDER_ROOT, e.g. from ../shared/bench/"
            "make_imagefolder.py OUT --imagefolder (then --data OUT/imagefolder)"
        )
    dev = _device()
    n = len(scan_imagefolder(data))
    p = Pipe(data, size, batch, workers, dev)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="decoded-cache-", dir=out) as tmp:  # removed afterwards
        cache = warm_cache(p, Path(tmp))
        loaders = {
            "a_recipe": lambda: images_per_s(lambda: recipe_batches(p), dev),
            "b_ours": lambda: images_per_s(lambda: ours_batches(p), dev),
            "c_floor": lambda: images_per_s(lambda: floor_batches(p), dev),
            "d_ours_cached": lambda: images_per_s(lambda: ours_batches(p, cache=cache, epoch=1), dev),
        }
        if is_jpeg(data):
            loaders["b_ours_full_jpeg"] = lambda: images_per_s(lambda: ours_batches(p, fast_jpeg=False), dev)
        if is_jpeg(data) and dev.type == "cuda":
            loaders["e_ours_gpu_decode"] = lambda: images_per_s(lambda: ours_batches(p, on_device=True), dev)
        tput = run_rounds(loaders, repeats)
        timed = {
            "naive_stats_s": lambda: naive_stats_seconds(data, workers),
            "exact_stats_s": lambda: exact_stats_seconds(data, workers),
            "exact_stats_cached_s": lambda: exact_stats_seconds(data, workers, cache),
        }
        if is_jpeg(data):
            timed["decode_fast_jpeg_ms"] = lambda: decode_ms(data, size, True)
            timed["decode_full_jpeg_ms"] = lambda: decode_ms(data, size, False)
        stats = run_rounds(timed, repeats)
    every = {**tput, **stats}
    med = {k: statistics.median(v) for k, v in every.items()}
    rows = [
        {"variant": k, "runs": len(v), "median": med[k], "min": min(v), "max": max(v)}
        for k, v in every.items()
    ]
    ratios = {
        "ours_vs_recipe": med["b_ours"] / med["a_recipe"],
        "ours_vs_floor": med["b_ours"] / med["c_floor"],
        "cached_vs_recipe": med["d_ours_cached"] / med["a_recipe"],
        "stats_speedup": med["naive_stats_s"] / med["exact_stats_s"],
        "cached_stats_speedup": med["naive_stats_s"] / med["exact_stats_cached_s"],
    }
    if "b_ours_full_jpeg" in med:
        ratios["fast_jpeg_vs_full_decode"] = med["b_ours"] / med["b_ours_full_jpeg"]
        ratios["fast_jpeg_decode_stage"] = med["decode_full_jpeg_ms"] / med["decode_fast_jpeg_ms"]
    if "e_ours_gpu_decode" in med:
        ratios["gpu_decode_vs_ours"] = med["e_ours_gpu_decode"] / med["b_ours"]
    meta = {
        "what": "data", "images": n, "device": str(dev), "workers": workers, "batch": batch, "size": size,
        "repeats": repeats, "cpu_count": os.cpu_count(), "ratios": ratios,
        "units": "loaders: images/s; stats: seconds; decode_*_ms: ms per image, one core",
    }  # fmt: skip
    write_results(out, rows, every, meta)
    sys.stdout.write(markdown_table(rows) + "\n" + json.dumps(ratios) + f"\nresults in {out}\n")
    return 0
