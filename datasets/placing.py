"""Putting files in place for organize: links, atomic copies, moves, and what a killed run leaves.

Why apart from datasets/organize.py: organize decides (read the CSV, reconcile with an earlier
run, refuse a bad plan as a whole); this module only carries a plan out, one file at a time,
so that every step keeps each image whole somewhere and a rerun finishes what a stop left.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import os
import re
import secrets
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distrib import signals
from distrib.errors import LaunchError
from distrib.signals import Stopped

MODES = ("link", "copy", "symlink", "move")
MANIFEST = "organize_manifest.csv"
_TMP_SUFFIX = ".organize-tmp"


@dataclass(frozen=True)
class Placement:
    """One file: where it is, where it goes, its class."""

    src: Path
    dst: Path
    label: str
    rel: str  # the CSV's file name, normalised to '/'


@dataclass
class OrganizePlan:
    """What a run would do; built without touching the output folder.

    ``relabel``, ``update`` and ``stale`` reconcile an output folder that an earlier
    organize filled (its manifest says which files it placed) with the CSV as it is now.
    """

    todo: list[Placement] = field(default_factory=list)
    done: list[Placement] = field(default_factory=list)  # already in place
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # on disk, not in the CSV
    duplicates: int = 0  # same file, same label, listed twice
    relabel: list[tuple[Path, Placement]] = field(default_factory=list)  # (old place, new placement)
    update: list[Placement] = field(default_factory=list)  # placed earlier; the source changed since
    stale: list[Placement] = field(default_factory=list)  # placed earlier; no longer in the CSV
    foreign: list[str] = field(default_factory=list)  # in the manifest, but replaced by someone else
    on_disk: Counter[str] = field(default_factory=Counter)  # images per class folder after the run

    @property
    def all(self) -> list[Placement]:
        placed = self.todo + self.done + self.update + [p for _, p in self.relabel]
        return sorted(placed, key=lambda p: (p.label, p.rel))

    @property
    def changes(self) -> int:
        return len(self.todo) + len(self.relabel) + len(self.update) + len(self.stale)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        return False
    return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def temporary(path: Path) -> Path:
    """A temporary name beside ``path``, unique to this process: two organizes of one folder (two
    jobs starting together, two nodes on a shared filesystem) never write the same temporary.
    It says whose it is (``<name>.<host>-<pid>-<token>.organize-tmp``), so cleaning up leftovers
    spares the temporaries of a run still going."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    return path.with_name(f"{path.name}.{owner}{_TMP_SUFFIX}")


_OWNED = re.compile(r"-(\d+)-[0-9a-f]{6}" + re.escape(_TMP_SUFFIX) + "$")


def _leftover(tmp: Path, now: float) -> bool:
    """A temporary of a run that ended: a dead process on this host, another host's over an hour
    old, or one of the older layout (no owner in its name)."""
    owned = _OWNED.search(tmp.name)
    if owned is None:
        return True
    if f".{socket.gethostname()}-{owned.group(1)}-" in tmp.name:
        try:
            os.kill(int(owned.group(1)), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
    try:
        return now - tmp.stat().st_mtime > 3600
    except OSError:
        return False


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy to a temporary name, fsync, rename: a crash never leaves a partial dst."""
    tmp = temporary(dst)
    with src.open("rb") as fi, tmp.open("wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, tmp)
    os.replace(tmp, dst)


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "link"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    _copy_atomic(src, dst)
    return "copy"


def place(p: Placement, mode: str) -> str:
    """Put one file in place; returns how ('link', 'copy', 'symlink')."""
    p.dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(p.src.resolve(), p.dst)
        return "symlink"
    how = "copy" if mode == "copy" else None
    if how:
        _copy_atomic(p.src, p.dst)
    else:
        how = _link_or_copy(p.src, p.dst)
    if mode == "move":
        with contextlib.suppress(FileNotFoundError):  # another organize of the same CSV got there first
            p.src.unlink()  # only now: dst is complete (a link, or an fsynced copy)
        return "moved"
    return how


def execute(plan: OrganizePlan, mode: str) -> Counter[str]:
    """Reconcile, then place every pending file; a source beside a finished move is removed.

    Every step keeps each image somewhere whole: relabels are renames inside ``out``, an
    updated file replaces ours atomically, and a stale file is only unlinked while its
    source exists (after a move it is moved back to the images folder instead).
    """
    counts: Counter[str] = Counter()
    for old, p in plan.relabel:
        p.dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(old, p.dst)
            counts["relabelled"] += 1
        except FileNotFoundError:  # another node sharing this folder did it first
            if not p.dst.exists():
                raise
            counts["already"] += 1
    for p in plan.update:
        tmp = temporary(p.dst)
        place(Placement(p.src, tmp, p.label, p.rel), "copy" if mode == "move" else mode)
        os.replace(tmp, p.dst)
        counts["updated"] += 1
    stop = signals.current()
    for i, p in enumerate(plan.todo):
        if stop.requested:
            raise Stopped(
                stop,
                f"organize stopped on {stop.name} after placing {i} of {len(plan.todo)} file(s) "
                f"({mode}); every file is whole in one place, and a rerun places the rest",
            )
        try:
            counts[place(p, mode)] += 1
        except FileExistsError:
            same = _same_file(p.src, p.dst)
            moved = mode == "move" and not p.src.exists() and p.dst.exists()  # after: by the other organize
            if not (same or moved):
                raise LaunchError(f"{p.dst} appeared meanwhile and differs from {p.src}") from None
            counts["already"] += 1
        except FileNotFoundError:  # moved meanwhile by another organize of the same CSV
            if p.src.exists() or not p.dst.exists():
                raise
            counts["already"] += 1
    for p in plan.stale:
        counts[remove_stale(p)] += 1
    if mode == "move":  # finish moves interrupted between link and unlink
        for p in plan.done:
            if p.src.exists() and _same_file(p.src, p.dst):
                try:
                    p.src.unlink()
                    counts["finished move"] += 1
                except FileNotFoundError:  # another organize of the same CSV, between its link and unlink
                    counts["already"] += 1  # when this one planned, has just finished that move
    _remove_empty_class_folders(plan)
    return counts


def remove_stale(p: Placement) -> str:
    """Take a file the CSV no longer lists out of the tree, never losing its only copy."""
    if p.src.exists():
        p.dst.unlink(missing_ok=True)  # missing: another node sharing the folder removed it
        return "removed"
    p.src.parent.mkdir(parents=True, exist_ok=True)
    try:
        place(Placement(p.dst, p.src, p.label, p.rel), "move")  # it was moved here: give it back
    except (FileExistsError, FileNotFoundError):  # another organize of the same CSV gave it back
        if not p.src.exists() or (p.dst.exists() and not _same_file(p.dst, p.src)):
            raise
        return "already"
    return "returned to the images folder"


def _remove_empty_class_folders(plan: OrganizePlan) -> None:
    """Class folders that reconciling emptied would make the tree an invalid ImageFolder."""
    for folder in {p.dst.parent for p in plan.stale} | {old.parent for old, _ in plan.relabel}:
        with contextlib.suppress(OSError):  # not empty: someone else's files are there
            folder.rmdir()


def disk_counts(out: Path) -> Counter[str]:
    """Files per class folder of ``out``, as they are on disk (hidden and temporary ones aside)."""
    counts: Counter[str] = Counter()
    if not out.is_dir():
        return counts
    for folder in sorted(d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")):
        counts[folder.name] = sum(
            1
            for f in folder.rglob("*")
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_TMP_SUFFIX)
        )
    return counts


def write_manifest(plan: OrganizePlan, out: Path) -> Path:
    import pandas as pd

    rows = [
        {"file_name": p.rel, "label": p.label, "path": str(p.dst.relative_to(out)), **_stat_columns(p.dst)}
        for p in plan.all
    ]
    path = out / MANIFEST
    tmp = temporary(path)
    pd.DataFrame(rows, columns=["file_name", "label", "path", "size", "mtime_ns"]).to_csv(tmp, index=False)
    os.replace(tmp, path)  # a killed run leaves the old manifest or the new one, never half of one
    return path


def _stat_columns(path: Path) -> dict[str, object]:
    try:
        size, mtime = _stat(path)
    except OSError:  # --allow-missing after a move: nothing there to describe
        return {"size": "", "mtime_ns": ""}
    return {"size": size, "mtime_ns": mtime}


def cleanup_temporaries(out: Path) -> int:
    """Remove partial copies left by a killed run (they never replaced anything); a run still
    going keeps its own."""
    n, now = 0, time.time()
    for tmp in out.rglob("*" + _TMP_SUFFIX):
        if not _leftover(tmp, now):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n
