"""Flat image folder + label CSV -> ImageFolder tree, safely and idempotently.

Why not the usual ``shutil.move`` loop: it can lose files (a crash between copy and
delete across file systems), clobber a same-named file of another class, and cannot be
re-run. Here everything is planned first (pure: paths, labels, conflicts, missing and
extra files) and refused as a whole if anything is wrong; then each file is placed by
hard link (a copy across file systems), never over a different file, and ``move`` only
removes a source once its destination is complete. A second run finds nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from datasets.placing import (
    MANIFEST,
    MODES,
    OrganizePlan,
    Placement,
    _same_file,
    _stat,
    cleanup_temporaries,
    disk_counts,
    execute,
    write_manifest,
)
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
_SHOW = 5
# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LabelCsv:
    """A label CSV and the names of its file and label columns."""

    path: str | Path
    file_col: str = "file_name"
    label_col: str = "label"


def read_labels(src: LabelCsv) -> list[tuple[str, str]]:
    """(file name, label) rows from the CSV; errors name the columns that exist."""
    import pandas as pd

    csv, file_col, label_col = src.path, src.file_col, src.label_col
    path = Path(csv)
    if not path.is_file():
        raise LaunchError(f"label CSV {csv} does not exist (--csv / data.csv)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise LaunchError(f"label CSV {csv} is empty; it needs a header and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LaunchError(f"label CSV {csv} cannot be parsed: {e}") from e
    absent = [c for c in (file_col, label_col) if c not in df.columns]
    if absent:
        raise LaunchError(
            f"label CSV {csv} has no column {', '.join(repr(c) for c in absent)}; columns found: "
            f"{', '.join(repr(c) for c in df.columns)}. Name them with --file-col / --label-col."
        )
    if df.empty:
        raise LaunchError(f"label CSV {csv} has a header but no rows")
    return list(zip(df[file_col].str.strip(), df[label_col].str.strip(), strict=True))


def safe_relative(name: str) -> str:
    """'a\\b.png' -> 'a/b.png'; absolute paths and '..' escapes are errors."""
    text = name.replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ValueError(f"{name!r} is absolute or empty; file names must be relative to --images")
    parts = PurePosixPath(text).parts
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ValueError(f"{name!r} escapes the images folder with '..'")
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def bad_label(label: str) -> bool:
    """Labels that cannot be a folder name."""
    return label in ("", ".", "..") or any(c in label for c in "/\\\0") or label != label.strip()


# --------------------------------------------------------------------------- planning


def _check_rows(rows: list[tuple[str, str]]) -> tuple[dict[str, str], int]:
    """Validate names and labels; return {relative name: label} and the duplicate count."""
    errors: list[str] = []
    labels: dict[str, str] = {}
    duplicates = 0
    for name, label in rows:
        try:
            rel = safe_relative(name)
        except ValueError as e:
            errors.append(str(e))
            continue
        if bad_label(label):
            errors.append(f"label {label!r} of {name!r} cannot be a folder name")
            continue
        if rel in labels:
            if labels[rel] != label:
                errors.append(f"{rel!r} is labelled both {labels[rel]!r} and {label!r}")
            duplicates += 1
            continue
        labels[rel] = label
    if errors:
        more = f" (and {len(errors) - _SHOW} more)" if len(errors) > _SHOW else ""
        raise LaunchError(
            "the label CSV has problems; nothing was changed:\n  - " + "\n  - ".join(errors[:_SHOW]) + more
        )
    return labels, duplicates


@dataclass(frozen=True)
class Placed:
    """A manifest row: where an earlier organize put a file, and its (size, mtime_ns) then."""

    label: str
    path: Path
    stat: tuple[int, int] | None  # None in manifests written before this was recorded


def read_manifest(out: Path) -> dict[str, Placed]:
    """What an earlier organize placed in ``out``, by the CSV's file name."""
    path = out / MANIFEST
    if not path.is_file():
        return {}
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        stats = zip(df.get("size", [""] * len(df)), df.get("mtime_ns", [""] * len(df)), strict=True)
        return {
            rel: Placed(label, out / p, (int(s), int(m)) if s and m else None)
            for rel, label, p, (s, m) in zip(df["file_name"], df["label"], df["path"], stats, strict=True)
        }
    except (ValueError, KeyError, pd.errors.ParserError) as e:
        raise LaunchError(
            f"{path} is damaged ({e}); it records what organize placed, so nothing is changed. "
            "Delete the output folder (it only holds links or copies) and organize again"
        ) from None


def _ours(src: Path, placed: Placed) -> bool:
    """The file at ``placed.path`` is still the one organize put there.

    True when it is the source itself (a hard link), unchanged since it was placed, or the
    only copy left after a move; a file someone put there instead is not ours to touch.
    """
    old = placed.path
    if not src.exists():
        return True
    with contextlib.suppress(OSError):
        if os.path.samefile(src, old) or (placed.stat is not None and _stat(old) == placed.stat):
            return True
    return placed.stat is None and _same_file(src, old)


def _unchanged(src: Path, placed: Path) -> bool:
    """The image at ``placed`` is still the source's (or the only copy, after a move)."""
    return not src.exists() or _same_file(src, placed)


def plan_organize(rows: list[tuple[str, str]], images: Path, out: Path) -> OrganizePlan:
    """Decide every placement; reconcile with an earlier run; refuse conflicts with other files.

    _a_move_between_our_looks: another organize of the same CSV moves a file by linking it to
    its place, then unlinking the source. Looking at the place, then at the source, can see
    neither (the link came after the first look, the unlink before the second), which read as
    "missing" (seen once in CI); a place looked at again after a missing source cannot miss it.
    """
    labels, duplicates = _check_rows(rows)
    previous = read_manifest(out)
    plan = OrganizePlan(duplicates=duplicates)
    conflicts: list[str] = []
    for rel, label in labels.items():
        src, dst = images / rel, out / label / PurePosixPath(rel).name
        p = Placement(src, dst, label, rel)
        before = previous.get(rel)
        moved = before is not None and before.path != dst and before.path.exists()
        if moved and not dst.exists() and _ours(src, before) and _unchanged(src, before.path):
            plan.relabel.append((before.path, p))  # its label changed since the last run
            continue
        if moved:  # the old copy leaves the tree (unless it is someone else's); placed anew below
            plan.stale.append(Placement(src, before.path, before.label, rel))
        if not dst.exists() and src.is_file():
            plan.todo.append(p)
        elif dst.exists():  # looked at again after the source: see _a_move_between_our_looks
            if _same_file(src, dst) or not src.exists():  # the source last: gone meanwhile = moved
                plan.done.append(p)  # placed earlier (or moved: the source is gone)
            elif before is not None and before.path == dst and _ours(src, before):
                plan.update.append(p)  # our copy, but the image itself was replaced since
            else:
                conflicts.append(f"{dst} exists and differs from {src}")
        else:
            plan.missing.append(rel)
    for rel, before in previous.items():
        if rel not in labels and before.path.exists():
            plan.stale.append(Placement(images / rel, before.path, before.label, rel))
    ours = [_ours(p.src, previous[p.rel]) for p in plan.stale]
    plan.foreign = [str(p.dst) for p, mine in zip(plan.stale, ours, strict=True) if not mine]
    plan.stale = [p for p, mine in zip(plan.stale, ours, strict=True) if mine]
    _check_collisions(plan, conflicts)
    plan.extra = _extra_files(images, set(labels))
    return plan


def _extra_files(images: Path, listed: set[str]) -> list[str]:
    if not images.is_dir():
        return []
    rels = (str(p.relative_to(images)).replace(os.sep, "/") for p in images.rglob("*") if p.is_file())
    return sorted(r for r in rels if r not in listed)


def _check_collisions(plan: OrganizePlan, conflicts: list[str]) -> None:
    """Two CSV rows that would land on the same destination (same base name, same class)."""
    seen: dict[Path, str] = {}
    for p in plan.all:
        if p.dst in seen:
            conflicts.append(f"{seen[p.dst]!r} and {p.rel!r} would both become {p.dst}")
        seen[p.dst] = p.rel
    if conflicts:
        raise LaunchError(
            "refusing to overwrite; nothing was changed:\n  - "
            + "\n  - ".join(conflicts[:_SHOW])
            + (f"\n  (and {len(conflicts) - _SHOW} more)" if len(conflicts) > _SHOW else "")
        )


# --------------------------------------------------------------------------- doing


def class_table(plan: OrganizePlan) -> str:
    """Images per class: what is on disk after a run (what would be, for a dry run)."""
    counts = plan.on_disk or Counter(p.label for p in plan.all)
    width = max([len(c) for c in counts] + [5])
    lines = [f"{'class':<{width}}  images"]
    lines += [f"{c:<{width}}  {n:>6}" for c, n in sorted(counts.items())]
    lines.append(f"{'total':<{width}}  {sum(counts.values()):>6}  ({len(counts)} classes)")
    return "\n".join(lines)


def _report(plan: OrganizePlan) -> None:
    if plan.extra:
        log.warning(
            "%d file(s) in the images folder are not in the CSV (left alone), e.g. %s",
            len(plan.extra),
            ", ".join(plan.extra[:_SHOW]),
        )
    if plan.duplicates:
        log.warning("%d CSV row(s) repeat a file with the same label (used once)", plan.duplicates)
    for what, items in (
        ("changed label since the last organize (moved to the new class)", [p.rel for _, p in plan.relabel]),
        (
            "were replaced in the images folder since the last organize (updated)",
            [p.rel for p in plan.update],
        ),
        ("are no longer in the CSV (taken out of the organised tree)", [p.rel for p in plan.stale]),
    ):
        if items:
            log.warning("%d file(s) %s, e.g. %s", len(items), what, ", ".join(items[:_SHOW]))
    if plan.foreign:
        log.warning(
            "%d file(s) an earlier organize placed were replaced by other files since; left alone: %s",
            len(plan.foreign),
            ", ".join(plan.foreign[:_SHOW]),
        )


def organize(
    csv: str | Path | LabelCsv,
    images: str | Path,
    out: str | Path,
    *,
    mode: str = "link",
    dry_run: bool = False,
    allow_missing: bool = False,
) -> OrganizePlan:
    """Plan, check, then place every file; returns the plan (for reports and tests).

    ``csv`` is a path (columns file_name and label) or a :class:`LabelCsv` naming others.
    """
    if mode not in MODES:
        raise LaunchError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise LaunchError(f"images folder {images} does not exist (--images / data.images)")
    if out.is_dir() and not dry_run:
        cleanup_temporaries(out)  # partial copies of a killed run; they replaced nothing
    rows = read_labels(csv if isinstance(csv, LabelCsv) else LabelCsv(csv))
    plan = plan_organize(rows, images, out)
    if plan.missing and mode == "move":  # another organize of this CSV may have been moving a file
        plan = plan_organize(rows, images, out)  # between our two looks: look again once
    if plan.missing and not (allow_missing or dry_run):
        raise LaunchError(
            f"{len(plan.missing)} image(s) named in {csv.path if isinstance(csv, LabelCsv) else csv} "
            f"are not in {images}, e.g. "
            f"{', '.join(plan.missing[:_SHOW])}. Fix the CSV or the folder, or pass "
            "--allow-missing to organise the rest; nothing was changed."
        )
    _report(plan)
    if dry_run:
        log.info(
            "dry run: would place %d file(s) (%s), relabel %d, update %d, take out %d; %d already in "
            "place, %d missing",
            len(plan.todo),
            mode,
            len(plan.relabel),
            len(plan.update),
            len(plan.stale),
            len(plan.done),
            len(plan.missing),
        )
        return plan
    return _carry_out(plan, out, mode)


def _carry_out(plan: OrganizePlan, out: Path, mode: str) -> OrganizePlan:
    """Execute the plan, write the manifest, count what is on disk and say what happened."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        counts = execute(plan, mode)
        write_manifest(plan, out)
    except OSError as e:
        raise LaunchError(
            f"cannot write to {e.filename or out}: {e.strerror}; choose a writable --out"
        ) from e
    plan.on_disk = disk_counts(out)
    _check_disk(plan, out)
    if plan.changes or counts:
        log.info(
            "placed %d file(s): %s; %d already in place",
            len(plan.todo),
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none",
            len(plan.done),
        )
    else:
        log.info("nothing to do: all %d file(s) already in place in %s", len(plan.done), out)
    return plan


def _check_disk(plan: OrganizePlan, out: Path) -> None:
    """Say so when the tree holds files this CSV did not place (someone else's)."""
    expected = Counter(p.label for p in plan.all)
    if plan.on_disk != expected:
        diff = {
            c: (plan.on_disk[c], expected[c])
            for c in plan.on_disk | expected
            if plan.on_disk[c] != expected[c]
        }
        log.warning(
            "%s holds files the CSV does not place there (class: on disk vs from the CSV): %s; "
            "they are not organize's and were left alone",
            out,
            ", ".join(f"{c}: {a} vs {b}" for c, (a, b) in sorted(diff.items())[:_SHOW]),
        )
