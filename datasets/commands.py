"""The data commands that run as workers: ``stats`` and ``preview``."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from datasets.build import build_split, normalization
from datasets.folder import IMG_EXTENSIONS, scan_imagefolder, write_bad_images, write_class_map
from datasets.preview import write_preview
from datasets.stats import compute_stats, format_stats
from distrib.config import Config
from distrib.context import DistContext
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


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
