"""ImageFolder scanning, the stratified deterministic split, and the class map.

Why not ``torchvision.datasets.ImageFolder`` itself: it keeps ``samples`` as a Python
list of (path, index) tuples, and every DataLoader worker that touches them bumps
reference counts, so forked workers' memory grows page by page to a full copy
(pytorch#13246). We keep torchvision's layout rules (one sorted folder per class, files
found recursively, the same extensions) but hold paths and targets in numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrib.errors import LaunchError
from distrib.seeding import entropy

log = logging.getLogger(__name__)
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IGNORED_FILES = ("thumbs.db", "desktop.ini", "organize_manifest.csv")
SPLIT_KEY = 0x5B117  # separates the split's random stream from every other use of the seed
_SHOW = 5


@dataclass(frozen=True)
class Samples:
    """Image paths and class indices as numpy arrays (safe to share with forked workers)."""

    paths: np.ndarray  # fixed-width unicode: no per-item Python objects
    targets: np.ndarray  # int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(self.paths[index], self.targets[index], self.classes)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


def _class_files(folder: Path, unreadable: list[str]) -> tuple[list[str], list[str]]:
    """(images, unsupported files) below one class folder, sorted, recursively; folders that
    cannot be listed go to ``unreadable`` (os.walk would skip them without a word)."""
    images, other = [], []

    def failed(e: OSError) -> None:
        unreadable.append(f"{e.filename} ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=failed, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _ignored(name):
                continue
            path = os.path.join(dirpath, name)
            (images if name.lower().endswith(IMG_EXTENSIONS) else other).append(path)
    return images, other


def scan_imagefolder(root: str | Path) -> Samples:
    """Scan an ImageFolder tree; empty classes and unsupported files are errors with the fix."""
    root = Path(root)
    if not root.is_dir():
        raise LaunchError(f"image folder {root} does not exist; set data.root or pass --data")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise LaunchError(
            f"cannot read image folder {root}: {e.strerror}; give this user read and execute permission "
            "on it (chmod a+rx), or point data.root / --data elsewhere"
        ) from None
    if not classes:
        loose = [f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS)]
        hint = (
            (
                f" It holds {len(loose)} images directly: for a flat folder with a label CSV use "
                "`launch.py organize` or data.csv + data.images."
            )
            if loose
            else ""
        )
        raise LaunchError(
            f"{root} has no class folders; an ImageFolder root holds one folder per class.{hint}"
        )
    paths: list[str] = []
    targets: list[int] = []
    empty, unsupported, unreadable = [], [], []
    for idx, name in enumerate(classes):
        images, other = _class_files(root / name, unreadable)
        unsupported += other
        if not images and not unreadable:
            empty.append(name)
        paths += images
        targets += [idx] * len(images)
    if unreadable:
        raise LaunchError(
            f"cannot read {len(unreadable)} folder(s) of {root}: {', '.join(unreadable[:_SHOW])}; give this "
            "user read and execute permission on them (chmod -R a+rX), or move them out"
        )
    _raise_scan_errors(root, empty, unsupported)
    return Samples(np.array(paths, dtype=str), np.array(targets, dtype=np.int64), tuple(classes))


def _raise_scan_errors(root: Path, empty: list[str], unsupported: list[str]) -> None:
    problems = []
    if empty:
        problems.append(
            f"{len(empty)} class folder(s) hold no images: {', '.join(empty[:_SHOW])} "
            "(remove them, or add images)"
        )
    if unsupported:
        exts = sorted({Path(p).suffix.lower() or "(none)" for p in unsupported})
        problems.append(
            f"{len(unsupported)} file(s) with unsupported extensions {', '.join(exts)}, e.g. "
            f"{', '.join(unsupported[:3])}; supported: {', '.join(IMG_EXTENSIONS)} "
            "(convert or move them out)"
        )
    if problems:
        raise LaunchError(f"{root} is not a usable ImageFolder:\n  - " + "\n  - ".join(problems))


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: per class, a seeded shuffle and ``round(fraction * n)`` held out.

    A function of (targets, fraction, seed) only, so every rank, every run and every
    world size gets the same split. Each class with >= 2 images lands in both splits.
    """
    train, val = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        perm = np.random.default_rng([entropy(seed), SPLIT_KEY, int(c)]).permutation(idx)
        n_val = int(round(fraction * len(idx))) if fraction > 0 else 0
        if len(idx) >= 2 and fraction > 0:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def dataset_key(*parts: object) -> str:
    """Short stable name for a dataset's derived files (organised cache, stats)."""
    return hashlib.sha1("\0".join(str(p) for p in parts).encode()).hexdigest()[:12]


def write_class_map(classes: tuple[str, ...], path: Path) -> None:
    """classes.json: {"classes": [...], "class_to_idx": {...}} (what checkpoints refer to)."""
    path.write_text(
        json.dumps(
            {"classes": list(classes), "class_to_idx": {c: i for i, c in enumerate(classes)}}, indent=2
        )
    )


def check_same_classes(train: Samples, val: Samples, val_root: str) -> None:
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise LaunchError(
            f"data.val_root {val_root} has other classes than the training data "
            f"(only in training: {only_t[:_SHOW]}, only in validation: {only_v[:_SHOW]}); "
            "both need the same class folders"
        )


def write_bad_images(run_dir: Path, paths: Sequence[str]) -> None:
    """bad_images.txt in the run directory: the files data.on_bad_image = 'skip' left out."""
    if paths:
        (run_dir / "bad_images.txt").write_text("".join(f"{p}\n" for p in sorted(set(paths))))
        log.warning(
            "%d undecodable image(s) skipped; list in %s", len(set(paths)), run_dir / "bad_images.txt"
        )
