"""ImageFolder scanning into numpy arrays, the stratified split, and dataset building."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.build import build_split
from datasets.folder import scan_imagefolder, stratified_split
from distrib.config import load_config
from distrib.context import DistContext
from distrib.errors import LaunchError


def make_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls}_{i:03d}.png")
    return root


def test_scan_keeps_torchvision_order_in_numpy_arrays(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"b": 2, "a": 3})
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(root))
    (root / "a" / "._a_000.png").write_bytes(b"x")  # macOS resource fork: skipped
    (root / "a" / "Thumbs.db").write_bytes(b"x")
    s = scan_imagefolder(root)
    assert s.classes == ("a", "b")
    assert isinstance(s.paths, np.ndarray) and s.paths.dtype.kind == "U"
    assert s.targets.dtype == np.int64 and s.targets.tolist() == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in s.paths[:2]] == ["a_000.png", "a_001.png"]
    assert [p for p, _ in tv.samples] == s.paths.tolist() and tv.targets == s.targets.tolist()


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 2})
    (root / "empty").mkdir()
    with pytest.raises(LaunchError, match="1 class folder\\(s\\) hold no images: empty"):
        scan_imagefolder(root)


def test_flat_folder_gets_the_organize_hint(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "x.png")
    with pytest.raises(LaunchError, match="launch.py organize"):
        scan_imagefolder(tmp_path / "d")
    with pytest.raises(LaunchError, match="does not exist"):
        scan_imagefolder(tmp_path / "absent")


def test_unsupported_extensions_are_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 1})
    (root / "a" / "notes.txt").write_text("x")
    (root / "a" / "scan.heic").write_bytes(b"x")
    with pytest.raises(LaunchError) as e:
        scan_imagefolder(root)
    assert ".heic, .txt" in str(e.value) and "supported" in str(e.value)


def test_split_is_stratified_deterministic_and_seeded() -> None:
    targets = np.repeat(np.arange(5), [2, 3, 10, 41, 1])
    tr, va = stratified_split(targets, 0.3, seed=7)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(targets)
    for c in range(4):  # every class with >= 2 images is in both splits
        assert (targets[tr] == c).any() and (targets[va] == c).any()
    assert not (targets[va] == 4).any()  # a single image stays in training
    assert (targets[va] == 3).sum() == round(0.3 * 41)
    tr2, va2 = stratified_split(targets, 0.3, seed=7)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, stratified_split(targets, 0.3, seed=8)[1])


def test_build_split_from_csv_and_from_val_root(tmp_path: Path) -> None:
    from datasets.synthetic import write_synthetic

    csv_path = write_synthetic(tmp_path / "s", classes=3, per_class=10, size=16)
    cfg = load_config(
        None,
        [
            f"data.csv={csv_path}",
            f"data.images={tmp_path / 's' / 'images'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    split = build_split(DistContext(), cfg)
    assert split.classes == ("disc", "square", "triangle")
    assert len(split.train) == 21 and len(split.val) == 9
    assert (tmp_path / "cache").is_dir()

    train = make_folder(tmp_path / "t", {"a": 3, "b": 3})
    val = make_folder(tmp_path / "v", {"a": 1, "b": 1})
    cfg = load_config(None, [f"data.root={train}", f"data.val_root={val}"])
    split = build_split(DistContext(), cfg)
    assert len(split.train) == 6 and len(split.val) == 2
    other = make_folder(tmp_path / "o", {"a": 1, "c": 1})
    with pytest.raises(LaunchError, match="other classes"):
        build_split(DistContext(), load_config(None, [f"data.root={train}", f"data.val_root={other}"]))


def test_one_class_and_no_data_are_errors(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"only": 3})
    with pytest.raises(LaunchError, match="single class"):
        build_split(DistContext(), load_config(None, [f"data.root={root}"]))
    with pytest.raises(LaunchError, match="no data configured"):
        build_split(DistContext(), load_config(None))
    with pytest.raises(LaunchError, match="go together"):
        build_split(DistContext(), load_config(None, ["data.csv=x.csv"]))
