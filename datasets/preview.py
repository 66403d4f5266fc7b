"""A PNG grid of one training batch after augmentation, captioned with class names.

The batch goes the whole way — uint8 augmentation, normalisation on the device — and is
then de-normalised, so the picture shows exactly what the model is fed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import v2

from datasets.build import DataSplit
from datasets.loader import LoaderSpec, build_loader
from datasets.transforms import Normalizer, train_transform
from distrib.config import Config
from distrib.context import DistContext

log = logging.getLogger(__name__)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def preview_grid(
    images: torch.Tensor, captions: Sequence[str], tile: int = 192, cols: int | None = None
) -> Image.Image:
    """(B, 3, H, W) uint8 -> one image: tiles of ``tile`` px with a caption bar each."""
    n = len(images)
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    bar = max(14, tile // 10)
    font = _font(bar - 4)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + bar)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    resize = v2.Resize([tile, tile], antialias=True)
    for i in range(n):
        r, c = divmod(i, cols)
        tile_img = resize(images[i].cpu()).permute(1, 2, 0).numpy()
        x, y = c * tile, r * (tile + bar)
        sheet.paste(Image.fromarray(tile_img), (x, y + bar))
        draw.text((x + 3, y + 1), captions[i][: max(4, tile // 7)], fill=(240, 240, 240), font=font)
    return sheet


def save_preview(images: torch.Tensor, captions: Sequence[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(images, captions).save(path)
    return path


def write_preview(
    ctx: DistContext,
    cfg: Config,
    split: DataSplit,
    mean: Sequence[float],
    std: Sequence[float],
    path: str | Path,
) -> Path | None:
    """Grid of one augmented batch of this rank's shard, normalised on the device and back."""
    spec = LoaderSpec.from_config(cfg, train=True)  # the training sampler and augmentation
    spec = dataclasses.replace(spec, batch_size=min(spec.batch_size, 16), num_workers=0, on_bad_image="skip")
    loader = build_loader(split.train, train_transform(cfg.data), ctx, spec)
    batch = next(iter(loader.epoch(0)), None)
    if batch is None or len(batch) == 0:
        log.warning("no batch to preview")
        return None
    norm = Normalizer(mean, std, ctx.device)
    shown = norm.denormalize(norm(batch.to(ctx.device).images))
    captions = [split.classes[int(t)] for t in batch.targets]
    out = save_preview(shown, captions, path)
    log.info("preview of %d images (%s) written to %s", len(batch), ", ".join(sorted(set(captions))), out)
    return out
