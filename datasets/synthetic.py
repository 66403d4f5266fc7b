"""Small deterministic demo data in the flat-folder + label-CSV layout.

Shapes (disc, square, triangle, cross, ring, bars...) of random colour, size and place
on a textured background: a small CNN can learn them, and they exercise the same path
as competition data (flat ``images/`` + ``labels.csv`` -> organize -> ImageFolder).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars", "diamond", "dots")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, (x1 - x0) // 2
    w = max(1, r // 3)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - w, y0, cx + w, y1), fill=colour)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=w)
    elif shape == "bars":
        for k in range(3):
            draw.rectangle((x0, y0 + k * 2 * w, x1, y0 + k * 2 * w + w - 1), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    else:
        for dx in (-1, 1):
            for dy in (-1, 1):
                draw.ellipse(
                    (cx + dx * r // 2 - w, cy + dy * r // 2 - w, cx + dx * r // 2 + w, cy + dy * r // 2 + w),
                    fill=colour,
                )


def make_image(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    base = rng.integers(0, 90, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    r = int(rng.integers(size // 5, size // 3 + 1))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    _draw(ImageDraw.Draw(img), shape, (cx - r, cy - r, cx + r, cy + r), colour)
    return img


def write_synthetic(
    out: str | Path,
    classes: int = 4,
    per_class: int = 16,
    size: int = 32,
    seed: int = 0,
    csv_name: str = "labels.csv",
) -> Path:
    """Write ``out/images/*.png`` and ``out/<csv_name>`` (file_name,label); returns the CSV path."""
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be 1..{len(SHAPES)}, got {classes}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(classes * per_class):
        shape = SHAPES[k % classes]
        name = f"img_{k:05d}.png"
        make_image(rng, shape, size).save(out / "images" / name)
        rows.append((name, shape))
    path = out / csv_name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name", "label"])
        w.writerows(rows)
    return path
