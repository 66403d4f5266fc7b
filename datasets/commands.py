"""The data commands that run as workers: ``stats``, ``preview`` and ``cache``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from datasets.build import build_split, normalization
from datasets.cache import DecodedCache, open_cache
from datasets.folder import IMG_EXTENSIONS, scan_imagefolder, write_bad_images, write_class_map
from datasets.loader import unwrap_worker_errors
from datasets.preview import write_preview
from datasets.stats import compute_stats, format_stats
from datasets.transforms import BadImageError, Decoder
from distrib import signals
from distrib.config import Config
from distrib.context import DistContext
from distrib.errors import LaunchError
from distrib.process_group import all_reduce_sum, gather_objects
from distrib.signals import Stopped

log = logging.getLogger(__name__)
PROGRESS_S = 5.0  # seconds between progress lines of `launch.py cache`


def image_paths(folder: str | Path) -> list[str]:
    """An ImageFolder's images, or the images of a flat folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LaunchError(f"--data {folder} does not exist")
    has_classes = any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(folder))
    if has_classes:
        return scan_imagefolder(folder).paths.tolist()
    flat = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not flat:
        raise LaunchError(f"--data {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return flat


def stats_job(
    ctx: DistContext,
    cfg: Config,
    run_dir: Path,
    *,
    data_dir: str,
    resize: Sequence[int] | None,
    as_json: bool,
) -> int:
    """Exact mean/std of ``data_dir``; rank 0 prints it and writes stats.json."""
    signals.install()  # SIGTERM/SIGINT: the pass stops within an image or two, in one line
    paths = image_paths(data_dir)
    stats = compute_stats(
        paths, ctx, resize=resize, num_workers=cfg.data.num_workers, skip_bad=cfg.data.on_bad_image == "skip"
    )
    if ctx.is_main:
        result = {
            "mean": list(stats.mean),
            "std": list(stats.std),
            "images": stats.images,
            "pixels": stats.pixels,
        }
        write_bad_images(run_dir, stats.skipped)
        (run_dir / "stats.json").write_text(
            json.dumps({**asdict(stats), "data": str(data_dir), "resize": list(resize or [])}, indent=2)
        )
        sys.stdout.write((json.dumps(result) if as_json else format_stats(stats)) + "\n")
        sys.stdout.flush()
    return 0


def check_output_path(path: Path, what: str) -> None:
    """Fail before any work if ``path`` cannot be written (a file in the way, no permission)."""
    blocking = next((a for a in path.parents if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise LaunchError(f"{what} {path}: {blocking} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(
            f"{what} {path}: cannot create its folder {path.parent} ({e.strerror}: {e.filename}); "
            "choose a path in a writable folder"
        ) from None
    if path.is_dir():
        raise LaunchError(f"{what} {path} is a folder; give a file name such as {path / 'preview.png'}")
    if not os.access(path.parent, os.W_OK):
        raise LaunchError(f"{what} {path}: folder {path.parent} is not writable; choose another path")


def preview_job(ctx: DistContext, cfg: Config, run_dir: Path, *, out: str | None) -> int:
    """One augmented training batch as a captioned grid (rank 0), plus the class map."""
    if ctx.is_main and out:
        check_output_path(Path(out), "preview --out")
    split = build_split(ctx, cfg)
    mean, std = normalization(ctx, cfg, split)
    if ctx.is_main:
        write_class_map(split.classes, run_dir / "classes.json")
        if write_preview(ctx, cfg, split, mean, std, out or run_dir / "preview.png") is None:
            raise LaunchError("the training split yields no batch to preview")
    return 0


class _Fill(Dataset):
    """Decodes one cache slot per item (in a DataLoader worker); returns 1, or the path if undecodable."""

    def __init__(self, cache: DecodedCache, slots: list[int], skip_bad: bool):
        self.cache, self.slots, self.skip_bad = cache, slots, skip_bad

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> int | str:
        slot = self.slots[i]
        path = str(self.cache.plan.paths[slot])
        try:
            self.cache.get(slot, path)
        except BadImageError as e:
            if not self.skip_bad:
                raise LaunchError(f"{e}; set data.on_bad_image = 'skip' to leave it out") from None
            return path
        return 1


def _first_item(items: list) -> object:
    return items[0]


def stopped_caching(stop: signals.StopRequest, cache: DecodedCache, done: int, todo: int) -> str:
    """The line a stopped ``cache`` leaves: what is cached, and that a rerun continues."""
    return (
        f"stopped on {stop.name}: this rank decoded {done} of its {todo} image(s); the decoded cache "
        f"{cache.plan.folder} now holds {cache.filled()} of {len(cache.plan.paths)}; a rerun "
        "(launch.py cache, or training with data.cache = 'disk') decodes only the rest"
    )


def cache_job(ctx: DistContext, cfg: Config, run_dir: Path) -> int:
    """``launch.py cache``: decode every image of both splits into the cache, with every core.

    Ranks share the slots r::W; each rank uses its share of the node's cores as workers.
    """
    stop = signals.install()  # SIGTERM/SIGINT: stop between images, say what is cached
    split = build_split(ctx, cfg)
    cache = open_cache(ctx, [split.train, split.val], cfg.data.cache_dir, Decoder.from_config(cfg.data),
                       cfg.data.on_bad_image == "skip")  # fmt: skip
    n = len(cache.plan.paths)
    todo = [s for s in range(ctx.rank, n, ctx.world_size) if not cache.current(s)]
    workers = max(1, (os.cpu_count() or 1) // ctx.local_world_size)
    loader = DataLoader(
        _Fill(cache, todo, cfg.data.on_bad_image == "skip"),
        batch_size=1,
        num_workers=min(workers, len(todo)),
        collate_fn=_first_item,
    )
    start = last = time.monotonic()
    skipped: list[str] = []
    done = 0
    for done, item in enumerate(unwrap_worker_errors(iter(loader)), 1):
        if stop.requested:
            del loader
            raise Stopped(stop, stopped_caching(stop, cache, done - 1, len(todo)))
        if isinstance(item, str):
            skipped.append(item)
        if ctx.is_main and time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            rate = done / (last - start)
            eta = time.strftime("%H:%M:%S", time.gmtime((len(todo) - done) / max(rate, 1e-9)))
            log.info("caching: %d/%d of this rank's images, %.0f img/s, ETA %s", done, len(todo), rate, eta)
    if stop.requested:  # the signal came after the last image
        raise Stopped(stop, stopped_caching(stop, cache, done, len(todo)))
    skipped = [p for part in gather_objects(ctx, skipped) for p in part]
    decoded = int(all_reduce_sum(ctx, torch.tensor([len(todo)], dtype=torch.int64)).item())
    if ctx.is_main:
        write_bad_images(run_dir, tuple(skipped))
        took = time.monotonic() - start
        log.info(
            "decoded cache %s: %d image(s) decoded in %.1f s, %d were already there%s",
            cache.plan.folder, decoded - len(skipped), took, n - decoded,
            f", {len(skipped)} undecodable (listed in the run directory)" if skipped else "",
        )  # fmt: skip
        if cfg.data.cache != "disk":
            log.info("training reads it with data.cache = 'disk' (now %r)", cfg.data.cache)
    return 0
