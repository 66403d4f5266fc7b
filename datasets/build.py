"""Config -> the run's training and validation samples, class map and normalisation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets.cache import CachedSource, open_cache
from datasets.folder import Samples, check_same_classes, dataset_key, scan_imagefolder, stratified_split
from datasets.organize import LabelCsv, organize
from datasets.stats import cached_stats
from datasets.transforms import Decoder, PixelSource
from distrib.config import Config, DataSection
from distrib.context import DistContext
from distrib.errors import LaunchError
from distrib.process_group import barrier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSplit:
    """What every rank agrees on before loading: the same arrays on each rank."""

    train: Samples
    val: Samples
    root: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes


def organized_root(ctx: DistContext, data: DataSection) -> Path:
    """csv + images -> an ImageFolder tree of hard links in the cache (once per node)."""
    csv, images = Path(data.csv).resolve(), Path(data.images).resolve()
    out = Path(data.cache_dir) / f"{csv.stem}-{dataset_key(csv, images, data.file_col, data.label_col)}"
    if ctx.local_rank == 0:
        organize(LabelCsv(csv, data.file_col, data.label_col), images, out, mode="link")
    barrier(ctx)
    return out


def ensure_demo_data(ctx: DistContext, data: DataSection) -> None:
    """data.synthetic: write the demo set where data.csv points, once per node, if absent."""
    if not (data.synthetic and data.csv) or Path(data.csv).exists():
        return
    if ctx.local_rank == 0:
        from datasets.synthetic import write_synthetic

        log.info(
            "writing the demo dataset (%d images per class) to %s", data.synthetic, Path(data.csv).parent
        )
        write_synthetic(Path(data.csv).parent, per_class=data.synthetic, csv_name=Path(data.csv).name)
    barrier(ctx)


def data_root(ctx: DistContext, data: DataSection) -> Path:
    if data.root:
        return Path(data.root)
    if data.csv and data.images:
        return organized_root(ctx, data)
    if data.csv or data.images:
        raise LaunchError("data.csv and data.images go together: set both (or data.root)")
    raise LaunchError(
        "no data configured: set data.root to an ImageFolder, or data.csv + data.images "
        "for a flat folder with a label CSV (--set data.root=/path)"
    )


def build_split(ctx: DistContext, cfg: Config) -> DataSplit:
    """Scan the data and split it, identically on every rank and in every run."""
    data = cfg.data
    ensure_demo_data(ctx, data)
    root = data_root(ctx, data)
    full = scan_imagefolder(root)
    if len(full.classes) < 2:
        raise LaunchError(
            f"{root} has a single class ({full.classes[0]!r}); a classifier needs at least two class folders"
        )
    if data.val_root:
        val = scan_imagefolder(data.val_root)
        check_same_classes(full, val, data.val_root)
        return DataSplit(full, val, root)
    tr, va = stratified_split(full.targets, data.val_fraction, cfg.run.seed)
    return DataSplit(full.subset(tr), full.subset(va), root)


@dataclass(frozen=True)
class Sources:
    """Where each split's pixels come from: the decoded cache, or None (decode every time)."""

    train: PixelSource | None = None
    val: PixelSource | None = None


def pixel_sources(ctx: DistContext, cfg: Config, split: DataSplit) -> Sources:
    """data.cache = 'disk': open (once per node: create) the cache of both splits."""
    if cfg.data.cache != "disk":
        return Sources()
    cache = open_cache(ctx, [split.train, split.val], cfg.data.cache_dir, Decoder.from_config(cfg.data),
                       cfg.data.on_bad_image == "skip")  # fmt: skip
    return Sources(CachedSource(cache, cache.slots(split.train)), CachedSource(cache, cache.slots(split.val)))


def normalization(
    ctx: DistContext, cfg: Config, split: DataSplit, sources: Sources | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """data.mean/std as given, or exact stats of the training split (cached per dataset)."""
    data = cfg.data
    if not isinstance(data.mean, str) and not isinstance(data.std, str):
        return tuple(data.mean), tuple(data.std)
    stats = cached_stats(split.train, ctx, data, sources.train if sources else None)
    return stats.mean, stats.std
