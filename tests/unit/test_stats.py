"""Exact mean/std from histograms against a float64 numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_stats as reference
from PIL import Image

from datasets.folder import Samples
from datasets.stats import cached_stats, compute_stats, stats_cache_path
from datasets.transforms import Decoder
from distrib.config import DataSection
from distrib.context import DistContext


def mixed_images(root: Path, n: int = 9) -> list[str]:
    """Different sizes, gray and RGBA among them, with different brightness per image."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 40, 2))
        arr = np.clip(rng.normal(30 * i, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        img = img.convert("L") if i % 4 == 1 else img.convert("RGBA") if i % 4 == 2 else img
        p = root / f"{i}.png"
        img.save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_against_float64_reference(workers: int, tmp_path: Path) -> None:
    paths = mixed_images(tmp_path)
    stats = compute_stats(paths, DistContext(), num_workers=workers)
    mean, std = reference(paths)
    assert np.allclose(stats.mean, mean, rtol=0, atol=1e-9)
    assert np.allclose(stats.std, std, rtol=0, atol=1e-9)
    assert stats.images == 9 and stats.pixels == sum(
        Image.open(p).size[0] * Image.open(p).size[1] for p in paths
    )
    # the shortcut misses the spread between images: clearly below the true std here
    assert all(e < -10 for e in stats.naive_error_pct())


def test_with_resize(tmp_path: Path) -> None:
    paths = mixed_images(tmp_path, 4)
    stats = compute_stats(paths, DistContext(), resize=(16, 12), num_workers=0)
    mean, std = reference(paths, (16, 12))
    assert np.allclose(stats.mean, mean, atol=1e-9) and np.allclose(stats.std, std, atol=1e-9)
    assert stats.pixels == 4 * 16 * 12


def test_bad_images_are_skipped_and_listed(tmp_path: Path) -> None:
    paths = mixed_images(tmp_path, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    stats = compute_stats([*paths, str(bad)], DistContext(), num_workers=0, skip_bad=True)
    assert stats.images == 3 and stats.skipped == (str(bad),)
    from distrib.errors import LaunchError

    with pytest.raises(LaunchError, match="bad.png"):
        compute_stats([*paths, str(bad)], DistContext(), num_workers=0)


def test_auto_stats_are_cached_per_dataset(tmp_path: Path) -> None:
    paths = mixed_images(tmp_path, 3)
    samples = Samples(np.array(paths), np.zeros(3, dtype=np.int64), ("a",))
    first = cached_stats(
        samples, DistContext(), DataSection(stats_cache=str(tmp_path / "c"), num_workers=0, fast_jpeg=False)
    )
    path = stats_cache_path(samples, Decoder(), tmp_path / "c")
    raw = json.loads(path.read_text())
    raw["mean"] = [0.5, 0.5, 0.5]  # mark the file: a second call must read it, not recompute
    path.write_text(json.dumps(raw))
    again = cached_stats(
        samples, DistContext(), DataSection(stats_cache=str(tmp_path / "c"), num_workers=0, fast_jpeg=False)
    )
    assert again.mean == (0.5, 0.5, 0.5) and again.std == first.std
    other = Samples(np.array(paths[:2]), np.zeros(2, dtype=np.int64), ("a",))
    assert stats_cache_path(other, Decoder(), tmp_path / "c") != path
    path.write_text("{broken")
    assert (
        cached_stats(
            samples,
            DistContext(),
            DataSection(stats_cache=str(tmp_path / "c"), num_workers=0, fast_jpeg=False),
        ).mean
        == first.mean
    )
