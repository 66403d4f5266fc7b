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
  meta.json     what the files hold (format, count, shape, decoder)
  paths.npy     the image paths, sorted (slot i holds paths[i])
  pixels.u8     count x 3 x H x W uint8, created sparse (disk fills as entries do)
  entries.i64   count x 4 int64: (state, file size, file mtime_ns, pixel checksum) per slot

Filling is lazy and lock-free: whichever process decodes a slot first writes its pixels,
then the file's size, mtime and the pixels' checksum, then state = FILLED last (the same
bytes if two processes race). A reader trusts a slot only if it is FILLED, the file's size
and mtime still match and the pixels still give the checksum, so a process killed mid-write
leaves a slot that is decoded again, a changed file is re-decoded, and pixels damaged on disk
(bytes overwritten, a truncated file grown back with zeros) are decoded again with a warning,
never used. The pages are the kernel's: a SIGKILLed writer loses nothing it wrote.

A cache whose files do not fit its plan (meta.json missing or describing another cache,
paths.npy, pixels.u8 or entries.i64 missing or of the wrong size) is damaged: it is set aside
and built again, with one warning naming the file. (After a power cut nothing is fsynced:
the checksums catch torn pages; deleting the folder is the quick way.)
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
from distrib.errors import EchoedError, LaunchError, write_problem
from distrib.process_group import gather_objects

log = logging.getLogger(__name__)
FORMAT = 2  # bump when the layout or the decoder's output changes: old caches are then ignored
EMPTY, FILLED = 0, 1
ENTRY = 4  # state, size, mtime_ns, checksum
_BLOCK = 512  # 8-byte words per checksum block (4 KiB: a page)
_WEIGHTS: dict[int, np.ndarray] = {}  # odd block weights by block count (one per image size)


def checksum(pixels: np.ndarray) -> int:
    """A 64-bit checksum of one slot's pixels (wrapping sums), as a signed int64 (the entries' dtype).

    The sum of each 4 KiB block's 8-byte words, then those block sums weighted by odd constants
    per block position. Any single changed byte changes its block's sum by d * 256**k (never 0
    mod 2**64), and an odd weight keeps that non-zero; zeroed, torn, moved or swapped pages
    change the weighted sum. (Bytes permuted inside one page would not: not a way files break.)
    Why not crc32: 1.1 ms per 3 MB image (1024 px), against 0.06 ms for these two numpy
    reductions, on a warm path that reads an image in about 0.25 ms (a warm epoch with CPU
    normalisation: +2.9%, README).
    """
    flat = np.ascontiguousarray(pixels).reshape(-1)
    body = len(flat) // (8 * _BLOCK) * (8 * _BLOCK)
    blocks = flat[:body].view(np.uint64).reshape(-1, _BLOCK).sum(axis=1, dtype=np.uint64)
    w = _WEIGHTS.get(len(blocks))
    if w is None:
        w = np.arange(1, 2 * len(blocks) + 1, 2, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        _WEIGHTS[len(blocks)] = w
    tail = flat[body:].astype(np.uint64)  # under a page (small images): each byte by its position
    value = int((blocks * w).sum(dtype=np.uint64))
    value = (value + int((tail * np.arange(1, len(tail) + 1, dtype=np.uint64)).sum())) % 2**64
    return value - 2**64 if value >= 2**63 else value


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
    def entry_bytes(self) -> int:
        return len(self.paths) * ENTRY * 8

    @property
    def total_bytes(self) -> int:
        return self.pixel_bytes + self.entry_bytes


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def common_size(paths: Sequence[str], skip_bad: bool = False) -> tuple[int, int]:
    """The one (H, W) of every image, read from the file headers; mixed sizes are an error, and so
    is an unreadable file unless ``skip_bad`` (data.on_bad_image = 'skip': it is left out here, and
    training skips it as it would without the cache)."""
    sizes: dict[tuple[int, int], list[str]] = {}
    for p in paths:
        try:
            sizes.setdefault(image_size(p), []).append(p)
        except BadImageError as e:
            if not skip_bad:
                raise LaunchError(f"{e}; set data.on_bad_image = 'skip' to leave it out") from None
            log.warning("skipping %s", e)
    if not sizes:
        raise LaunchError("no readable image to size the decoded cache by; check the data folder")
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
    samples: Sequence[Samples],
    cache_dir: str | Path,
    decoder: Decoder,
    size: Sequence[int] | None = None,
    skip_bad: bool = False,
) -> CachePlan:
    """The cache for every image of ``samples`` (train and validation) as ``decoder`` makes them.

    ``size``: the images' (H, W) when already known (else data.resize, else read from the headers).
    """
    paths = np.unique(np.concatenate([s.paths for s in samples]))
    h, w = size or (tuple(decoder.resize) if decoder.resize else common_size(paths.tolist(), skip_bad))
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
    problem = write_problem(base)
    if problem:
        raise LaunchError(
            f"data.cache_dir {base} is not writable ({problem}); set data.cache_dir to a "
            "writable folder on a local disk, or data.cache = 'off'"
        )
    needed = plan.total_bytes - _allocated(plan.folder / "pixels.u8")
    free = shutil.disk_usage(base).free
    if needed > free:
        raise LaunchError(
            f"the decoded cache for {len(plan.paths)} image(s) of {plan.shape[1]}x{plan.shape[2]} needs "
            f"{_gib(needed)} more in {base}, which has {_gib(free)} free; free space there, set "
            "data.cache_dir to a bigger disk, set a smaller data.resize, or data.cache = 'off'"
        )


def _meta(plan: CachePlan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "count": len(plan.paths),
        "shape": list(plan.shape),
        "decoder": plan.decoder.key(),
    }


def _sizes(plan: CachePlan) -> dict[str, int]:
    """The byte size each data file of the cache must have."""
    return {"pixels.u8": plan.pixel_bytes, "entries.i64": plan.entry_bytes}


def damage(plan: CachePlan) -> str | None:
    """What is wrong with the cache on disk (a file missing, of the wrong size, describing another
    cache), or None when it fits its plan or does not exist yet. Cheap: stats and two small reads."""
    folder = plan.folder
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return f"{folder / 'meta.json'} is missing"
    except (OSError, ValueError) as e:
        return f"{folder / 'meta.json'} cannot be read ({e})"
    if meta != _meta(plan):
        return f"{folder / 'meta.json'} describes another cache ({meta}, not {_meta(plan)})"
    for name, size in _sizes(plan).items():
        try:
            found = (folder / name).stat().st_size
        except OSError as e:
            return f"{folder / name} is {'missing' if isinstance(e, FileNotFoundError) else e.strerror}"
        if found != size:
            return f"{folder / name} holds {found:,} bytes, not {size:,} (truncated or replaced)"
    try:
        paths = np.load(folder / "paths.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        return f"{folder / 'paths.npy'} cannot be read ({e})"
    if not np.array_equal(paths, plan.paths):
        return f"{folder / 'paths.npy'} lists other images than this dataset"
    return None


def set_aside(folder: Path) -> None:
    """Move a damaged cache out of the way (an atomic rename, so no process reads it half-deleted),
    then delete it. Another node may have done so first: that is fine."""
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def create(plan: CachePlan) -> None:
    """Write an empty cache under a temporary name, then rename it into place (atomic).

    A damaged cache in its place (see :func:`damage`) is set aside first, with a warning:
    its pixels are decoded again rather than trusted."""
    problem = damage(plan)
    if problem:
        log.warning("decoded cache damaged: %s; building it again (its images are decoded again)", problem)
        set_aside(plan.folder)
    if (plan.folder / "meta.json").exists():
        return
    tmp = plan.folder.with_name(f".{plan.folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "paths.npy", plan.paths)
        for name, size in _sizes(plan).items():
            with open(tmp / name, "wb") as fh:
                fh.truncate(size)  # sparse zeros: every slot EMPTY, pixel blocks taken as slots fill
        (tmp / "meta.json").write_text(json.dumps(_meta(plan)))
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


def _map(path: Path, size: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A writable memory map of a cache file that must already have ``size`` bytes.

    np.memmap would grow a short file with zeros (hiding a truncation) and a missing one is a
    FileNotFoundError deep in a DataLoader worker: both are one line naming the file instead."""
    try:
        found = path.stat().st_size
    except OSError as e:
        found, why = -1, e.strerror
    if found != size:
        what = f"holds {found:,} bytes, not {size:,}" if found >= 0 else f"cannot be opened ({why})"
        raise LaunchError(
            f"decoded cache file {path} {what}: it was changed while this job ran; rerun "
            f"(the cache is checked and rebuilt at the start), or delete {path.parent}"
        )
    return np.memmap(path, dtype, "r+", shape=shape)


class DecodedCache:
    """One node's view of a cache: opened lazily in each process (workers map the same file)."""

    def __init__(self, plan: CachePlan):
        self.plan = plan
        self._pixels: np.ndarray | None = None
        self._entries: np.ndarray | None = None
        self._damaged = 0  # slots found damaged and decoded again, in this process

    def __getstate__(self) -> dict[str, Any]:  # a memmap must not be pickled (it would copy)
        return {"plan": self.plan, "_pixels": None, "_entries": None, "_damaged": 0}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pixels is None or self._entries is None:
            n, shape, folder = len(self.plan.paths), self.plan.shape, self.plan.folder
            sizes = _sizes(self.plan)
            self._pixels = _map(folder / "pixels.u8", sizes["pixels.u8"], (n, *shape), np.uint8)
            self._entries = _map(folder / "entries.i64", sizes["entries.i64"], (n, ENTRY), np.int64)
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
        """The pixels of ``path``: from the cache when its slot is current and intact, else decoded
        and stored."""
        pixels, entries = self._open()
        try:
            st = os.stat(path)
        except OSError as e:
            raise BadImageError(f"cannot read {path}: {e.strerror}") from None
        if _holds(entries[slot], st):
            image = np.array(pixels[slot])
            if checksum(image) == entries[slot, 3]:
                return torch.from_numpy(image)
            self._note_damage(slot, path)
        return self.store(slot, path, st)

    def store(self, slot: int, path: str, st: os.stat_result) -> torch.Tensor:
        """Decode ``path`` into its slot: flag cleared first, pixels, file identity and checksum, flag."""
        pixels, entries = self._open()
        image = self.plan.decoder(path)
        if tuple(image.shape) != self.plan.shape:
            raise LaunchError(
                f"{path} decodes to {tuple(image.shape[1:])}, not the cache's {self.plan.shape[1:]} "
                f"(the file changed size?); set data.resize, or delete {self.plan.folder}"
            )
        array = image.numpy()
        entries[slot, 0] = EMPTY  # first: a reader never sees old "filled" over new pixels
        pixels[slot] = array
        entries[slot, 1:] = (st.st_size, st.st_mtime_ns, checksum(array))
        entries[slot, 0] = FILLED  # last
        return image

    def _note_damage(self, slot: int, path: str) -> None:
        self._damaged += 1
        (log.warning if self._damaged == 1 else log.debug)(
            "decoded cache: the stored pixels of %s (slot %d of %s) fail their checksum (the file was "
            "changed on disk); decoded again%s",
            path,
            slot,
            self.plan.folder / "pixels.u8",
            "" if self._damaged > 1 else " (further damaged slots in this process: debug log)",
        )

    def filled(self) -> int:
        """Slots marked filled (current or not)."""
        return int((self._open()[1][:, 0] == FILLED).sum())

    def all_filled(self, slots: np.ndarray) -> bool:
        """Every one of ``slots`` has its flag set; from the flags alone, no file is stat'ed."""
        return bool((self._open()[1][slots, 0] == FILLED).all())

    def current(self, slot: int) -> bool:
        """Slot ``slot`` holds the pixels of its file as it is now (flag, identity, checksum)."""
        pixels, entries = self._open()
        try:
            st = os.stat(self.plan.paths[slot])
        except OSError:
            return False
        return _holds(entries[slot], st) and checksum(pixels[slot]) == entries[slot, 3]


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
    ctx: DistContext,
    samples: Sequence[Samples],
    cache_dir: str | Path,
    decoder: Decoder,
    skip_bad: bool = False,
) -> DecodedCache:
    """Plan and (once per node) create the cache; every rank learns any refusal, none hangs."""
    err: str | None = None
    plan: CachePlan | None = None
    if ctx.local_rank == 0:
        try:
            plan = plan_cache(samples, cache_dir, decoder, skip_bad=skip_bad)
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
