"""The decoded-image cache (``data.cache = "disk"``): pixels stored once, read every epoch after.

Why: the deterministic part of the pipeline (decode -> 3 x uint8 -> resize) gives the same
pixels every epoch, and decoding is most of a CPU loader's time (the decode-only floor is
1.8-1.9x the common recipe; nothing that decodes every epoch gets past it). The cache keeps
those pixels in one uint8 memory-mapped file per (dataset, size, decoder) under
``data.cache_dir``; every DataLoader worker of every rank on the node maps the same file,
so epoch 2 on reads pixels instead of decoding. Random augmentation still runs per item
from ``(seed, epoch, index)`` after the read, so batches are bit-identical with the cache
on or off.

Layout of ``<cache_dir>/decoded-<key>/``:
  meta.json     what the files hold (count, shape, decoder, the paths' fingerprint)
  paths.npy     the image paths, sorted (slot i holds paths[i])
  pixels.u8     count x 3 x H x W uint8, created sparse (disk fills as entries do)
  entries.i64   count x 3 int64: (state, file size, file mtime_ns) per slot

Filling is lazy and lock-free: whichever process decodes a slot first writes its pixels,
then the file's size and mtime, then state = FILLED last (the same bytes if two processes
race). A reader trusts a slot only if it is FILLED and the file's size and mtime still
match, so a process killed mid-write leaves a slot that is decoded again, and a changed file
is re-decoded. The pages are the kernel's: a SIGKILLed writer loses nothing it wrote. (A
power cut is another matter: nothing is fsynced; delete the folder after one.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.folder import Samples, dataset_key
from datasets.transforms import BadImageError, Decoder, image_size
from distrib.context import DistContext
from distrib.errors import EchoedError, LaunchError
from distrib.process_group import gather_objects

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout or the decoder's output changes: old caches are then ignored
EMPTY, FILLED = 0, 1
_ENTRY = 3  # state, size, mtime_ns


@dataclass(frozen=True)
class CachePlan:
    """What a cache holds, decided before anything is written."""

    folder: Path
    paths: np.ndarray  # sorted, unique
    shape: tuple[int, int, int]  # (3, H, W)
    decoder: Decoder

    @property
    def pixel_bytes(self) -> int:
        return int(len(self.paths) * int(np.prod(self.shape)))

    @property
    def total_bytes(self) -> int:
        return self.pixel_bytes + len(self.paths) * _ENTRY * 8


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def common_size(paths: Sequence[str]) -> tuple[int, int]:
    """The one (H, W) of every image, read from the file headers; mixed sizes are an error."""
    sizes: dict[tuple[int, int], list[str]] = {}
    for p in paths:
        sizes.setdefault(image_size(p), []).append(p)
    if len(sizes) == 1:
        return next(iter(sizes))
    found = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
    listed = "; ".join(f"{h}x{w}: {len(ps)} image(s), e.g. {ps[0]}" for (h, w), ps in found[:3])
    (h, w), _ = found[0]
    raise LaunchError(
        f"data.cache = 'disk' stores images of one size, and these differ ({listed}); set "
        f"data.resize = [{h}, {w}] (or the size the model wants), or data.cache = 'off'"
    )


def plan_cache(
    samples: Sequence[Samples], cache_dir: str | Path, decoder: Decoder, size: Sequence[int] | None = None
) -> CachePlan:
    """The cache for every image of ``samples`` (train and validation) as ``decoder`` makes them.

    ``size``: the images' (H, W) when already known (else data.resize, else read from the headers).
    """
    paths = np.unique(np.concatenate([s.paths for s in samples]))
    h, w = size or (tuple(decoder.resize) if decoder.resize else common_size(paths.tolist()))
    shape = (3, int(h), int(w))
    key = dataset_key(FORMAT, len(paths), shape, decoder.key(), *paths.tolist())
    return CachePlan(Path(cache_dir) / f"decoded-{key}", paths, shape, decoder)


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def check_room(plan: CachePlan) -> None:
    """Refuse a cache that would not fit, with the figures, before a byte of it is written."""
    base = plan.folder.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LaunchError(
            f"data.cache_dir {base} is not writable ({e.strerror}); set data.cache_dir to a "
            "writable folder on a local disk, or data.cache = 'off'"
        ) from None
    needed = plan.total_bytes - _allocated(plan.folder / "pixels.u8")
    free = shutil.disk_usage(base).free
    if needed > free:
        raise LaunchError(
            f"the decoded cache for {len(plan.paths)} image(s) of {plan.shape[1]}x{plan.shape[2]} needs "
            f"{_gib(needed)} more in {base}, which has {_gib(free)} free; free space there, set "
            "data.cache_dir to a bigger disk, set a smaller data.resize, or data.cache = 'off'"
        )


def create(plan: CachePlan) -> None:
    """Write an empty cache under a temporary name, then rename it into place (atomic)."""
    if (plan.folder / "meta.json").exists():
        return
    tmp = plan.folder.with_name(f".{plan.folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "paths.npy", plan.paths)
        with open(tmp / "pixels.u8", "wb") as fh:
            fh.truncate(plan.pixel_bytes)  # sparse: blocks are taken as slots fill
        with open(tmp / "entries.i64", "wb") as fh:
            fh.truncate(len(plan.paths) * _ENTRY * 8)  # zeros: every slot EMPTY
        meta = {
            "format": FORMAT,
            "count": len(plan.paths),
            "shape": list(plan.shape),
            "decoder": plan.decoder.key(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(plan.folder)
        except OSError:  # another node's process made it first (a shared cache_dir)
            if not (plan.folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _holds(entry: np.ndarray, st: os.stat_result) -> bool:
    """A slot's entry describes the file as it is now, and its pixels are complete."""
    return bool(entry[0] == FILLED and entry[1] == st.st_size and entry[2] == st.st_mtime_ns)


class DecodedCache:
    """One node's view of a cache: opened lazily in each process (workers map the same file)."""

    def __init__(self, plan: CachePlan):
        self.plan = plan
        self._pixels: np.ndarray | None = None
        self._entries: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:  # a memmap must not be pickled (it would copy)
        return {"plan": self.plan, "_pixels": None, "_entries": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pixels is None or self._entries is None:
            n, shape = len(self.plan.paths), self.plan.shape
            self._pixels = np.memmap(self.plan.folder / "pixels.u8", np.uint8, "r+", shape=(n, *shape))
            self._entries = np.memmap(self.plan.folder / "entries.i64", np.int64, "r+", shape=(n, _ENTRY))
        return self._pixels, self._entries

    def slots(self, samples: Samples) -> np.ndarray:
        """Each sample's slot in the cache."""
        slots = np.searchsorted(self.plan.paths, samples.paths)
        if len(samples) and not np.array_equal(
            self.plan.paths[np.minimum(slots, len(self.plan.paths) - 1)], samples.paths
        ):
            raise LaunchError("internal: an image that the decoded cache was not planned for")
        return slots.astype(np.int64)

    def get(self, slot: int, path: str) -> torch.Tensor:
        """The pixels of ``path``: from the cache when its slot is current, else decoded and stored."""
        pixels, entries = self._open()
        try:
            st = os.stat(path)
        except OSError as e:
            raise BadImageError(f"cannot read {path}: {e.strerror}") from None
        if _holds(entries[slot], st):
            return torch.from_numpy(np.array(pixels[slot]))
        image = self.plan.decoder(path)
        if tuple(image.shape) != self.plan.shape:
            raise LaunchError(
                f"{path} decodes to {tuple(image.shape[1:])}, not the cache's {self.plan.shape[1:]} "
                f"(the file changed size?); set data.resize, or delete {self.plan.folder}"
            )
        entries[slot, 0] = EMPTY  # first: a reader never sees old "filled" over new pixels
        pixels[slot] = image.numpy()
        entries[slot, 1:] = (st.st_size, st.st_mtime_ns)
        entries[slot, 0] = FILLED  # last
        return image

    def filled(self) -> int:
        """Slots marked filled (current or not)."""
        return int((self._open()[1][:, 0] == FILLED).sum())

    def all_filled(self, slots: np.ndarray) -> bool:
        """Every one of ``slots`` has its flag set; from the flags alone, no file is stat'ed."""
        return bool((self._open()[1][slots, 0] == FILLED).all())

    def current(self, slot: int) -> bool:
        """Slot ``slot`` holds the pixels of its file as it is now."""
        _, entries = self._open()
        try:
            st = os.stat(self.plan.paths[slot])
        except OSError:
            return False
        return _holds(entries[slot], st)


@dataclass(frozen=True)
class CachedSource:
    """``ImageDataset``'s pixel source for one split: sample index -> cache slot."""

    cache: DecodedCache
    slot_of: np.ndarray

    def __call__(self, path: str, index: int) -> torch.Tensor:
        return self.cache.get(int(self.slot_of[index]), path)

    def warm(self) -> bool:
        """Every image of the split is in the cache: an epoch decodes only files changed since.

        The flags alone (a numpy comparison), not a stat per file: a million files on a network
        filesystem would take minutes every epoch. A read still checks its file's size and mtime.
        """
        return self.cache.all_filled(self.slot_of)


def open_cache(
    ctx: DistContext, samples: Sequence[Samples], cache_dir: str | Path, decoder: Decoder
) -> DecodedCache:
    """Plan and (once per node) create the cache; every rank learns any refusal, none hangs."""
    err: str | None = None
    plan: CachePlan | None = None
    if ctx.local_rank == 0:
        try:
            plan = plan_cache(samples, cache_dir, decoder)
            check_room(plan)
            create(plan)
        except LaunchError as e:
            err = str(e)
        except OSError as e:
            err = (
                f"cannot create the decoded cache in {cache_dir}: {e}; "
                "set data.cache_dir to a writable local folder, or data.cache = 'off'"
            )
    # every rank waits here for its node's local rank 0 to have created the cache (no barrier needed)
    told = gather_objects(ctx, (err, plan.shape[1:] if plan else None))
    errors = [e for e, _ in told if e]
    if errors:
        raise LaunchError(err) if err else EchoedError(errors[0])
    if plan is None:  # the size our node's local rank 0 found (ranks are numbered node by node)
        plan = plan_cache(samples, cache_dir, decoder, told[ctx.rank - ctx.local_rank][1])
    cache = DecodedCache(plan)
    if ctx.is_main:
        n = len(plan.paths)
        done = cache.filled()
        h, w = plan.shape[1:]
        pct = 100 * done / max(n, 1)
        size = _gib(plan.total_bytes)
        log.info(
            "decoded cache %s: %d image(s) of %dx%d, %s; %d filled (%.0f%%)",
            plan.folder,
            n,
            h,
            w,
            size,
            done,
            pct,
        )
    return cache
