"""organize: flat images + label CSV -> ImageFolder, safe, idempotent, loses nothing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from datasets import organize as org
from datasets import placing
from datasets.organize import organize
from datasets.synthetic import write_synthetic
from distrib.errors import LaunchError

MAKE_IMAGEFOLDER = REPO.parent / "shared" / "bench" / "make_imagefolder.py"


def tree(root: Path) -> dict[str, bytes]:
    """Class folders' files and their bytes (the manifest at the root is not part of it)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent != root
    }


def write_csv(path: Path, rows: list[tuple[str, str]], header=("file_name", "label")) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def flat(tmp_path: Path, names: list[str]) -> Path:
    images = tmp_path / "images"
    for n in names:
        p = images / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"bytes of {n}".encode())
    return images


@pytest.mark.skipif(not MAKE_IMAGEFOLDER.exists(), reason="../shared/bench/make_imagefolder.py absent")
def test_same_tree_as_make_imagefolder(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(MAKE_IMAGEFOLDER),
            str(tmp_path / "d"),
            "--classes",
            "5",
            "--per-class",
            "3",
            "--size",
            "32",
            "--imagefolder",
        ],
        check=True,
        capture_output=True,
    )
    d = tmp_path / "d"
    organize(d / "train_df.csv", d / "train", tmp_path / "out")
    assert tree(tmp_path / "out") == tree(d / "imagefolder")
    assert len(tree(tmp_path / "out")) == 15


def test_synthetic_flat_folder_becomes_class_folders(tmp_path: Path) -> None:
    csv_path = write_synthetic(tmp_path / "s", classes=3, per_class=4, size=16)
    plan = organize(csv_path, tmp_path / "s" / "images", tmp_path / "out")
    got = tree(tmp_path / "out")
    assert sorted({k.split("/")[0] for k in got}) == ["disc", "square", "triangle"]
    assert len(got) == 12 and len(plan.todo) == 12
    # hard links by default: same inode, no extra space
    one = next((tmp_path / "out" / "disc").iterdir())
    assert one.stat().st_ino == (tmp_path / "s" / "images" / one.name).stat().st_ino
    manifest = (tmp_path / "out" / org.MANIFEST).read_text().splitlines()
    assert manifest[0] == "file_name,label,path,size,mtime_ns" and len(manifest) == 13


def test_second_run_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = flat(tmp_path, ["a.png", "b.png", "c.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "y"), ("c.png", "x")])
    organize(csv_path, images, tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")}
    caplog.set_level("INFO")
    plan = organize(csv_path, images, tmp_path / "out")
    assert plan.todo == [] and len(plan.done) == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*.png")} == before
    assert "nothing to do" in caplog.text


def test_backslash_and_subfolder_names(tmp_path: Path) -> None:
    images = flat(tmp_path, ["sub/a.png", "sub/deeper/b.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("sub\\a.png", "x"), ("./sub/deeper/b.png", "y")])
    organize(csv_path, images, tmp_path / "out", mode="copy")
    assert sorted(tree(tmp_path / "out")) == ["x/a.png", "y/b.png"]


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../x.png", "C:\\x.png"])
def test_absolute_and_escaping_paths_are_refused(name: str, tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), (name, "y")])
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "nothing was changed" in str(e.value) and not (tmp_path / "out").exists()


def test_conflicting_labels_are_an_error(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("a.png", "y")])
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "'a.png' is labelled both 'x' and 'y'" in str(e.value)


def test_repeated_row_with_the_same_label_is_used_once(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("a.png", "x")])
    assert organize(csv_path, images, tmp_path / "out").duplicates == 1


@pytest.mark.parametrize("label", ["", "..", "a/b", "a\\b"])
def test_unusable_labels(label: str, tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", label)])
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "cannot be a folder name" in str(e.value)


def test_missing_columns_list_the_columns_found(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x")], header=("image", "class"))
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "no column 'file_name', 'label'" in str(e.value) and "'image', 'class'" in str(e.value)
    organize(org.LabelCsv(csv_path, "image", "class"), images, tmp_path / "out")
    assert (tmp_path / "out" / "x" / "a.png").exists()


def test_empty_csv_and_header_only(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LaunchError, match="is empty"):
        organize(tmp_path / "empty.csv", images, tmp_path / "out")
    (tmp_path / "header.csv").write_text("file_name,label\n")
    with pytest.raises(LaunchError, match="no rows"):
        organize(tmp_path / "header.csv", images, tmp_path / "out")


def test_missing_files_are_reported_and_nothing_changes(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    rows = [("a.png", "x")] + [(f"gone{i}.png", "x") for i in range(7)]
    csv_path = write_csv(tmp_path / "l.csv", rows)
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "7 image(s)" in str(e.value) and "gone0.png" in str(e.value)
    assert not (tmp_path / "out").exists()
    plan = organize(csv_path, images, tmp_path / "out", allow_missing=True)
    assert len(plan.missing) == 7 and (tmp_path / "out" / "x" / "a.png").exists()


def test_files_not_in_the_csv_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = flat(tmp_path, ["a.png", "stray.png"])
    plan = organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, tmp_path / "out")
    assert plan.extra == ["stray.png"] and "stray.png" in caplog.text


def test_never_overwrites_a_different_file(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png", "b.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "x")])
    (tmp_path / "out" / "x").mkdir(parents=True)
    (tmp_path / "out" / "x" / "a.png").write_bytes(b"someone else's file")
    with pytest.raises(LaunchError) as e:
        organize(csv_path, images, tmp_path / "out")
    assert "exists and differs" in str(e.value)
    assert (tmp_path / "out" / "x" / "a.png").read_bytes() == b"someone else's file"
    assert not (tmp_path / "out" / "x" / "b.png").exists()


def test_two_rows_landing_on_one_name_are_refused(tmp_path: Path) -> None:
    images = flat(tmp_path, ["d1/a.png", "d2/a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("d1/a.png", "x"), ("d2/a.png", "x")])
    with pytest.raises(LaunchError, match="would both become"):
        organize(csv_path, images, tmp_path / "out")


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    plan = organize(
        write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, tmp_path / "out", mode="move", dry_run=True
    )
    assert len(plan.todo) == 1 and not (tmp_path / "out").exists() and (images / "a.png").exists()


def test_unwritable_output(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(LaunchError, match="cannot write"):
        organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, tmp_path / "file" / "out")
    assert (images / "a.png").exists()


def test_copy_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as src:
        images = flat(Path(src), ["a.png"])
        organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, tmp_path / "out", mode="move")
        assert (tmp_path / "out" / "x" / "a.png").read_bytes() == b"bytes of a.png"
        assert not (images / "a.png").exists()


def test_move_interrupted_between_link_and_unlink_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"f{i}.png" for i in range(6)]
    images = flat(tmp_path, names)
    csv_path = write_csv(tmp_path / "l.csv", [(n, "x") for n in names])
    real_unlink, calls = Path.unlink, []

    def dying_unlink(self: Path, missing_ok: bool = False) -> None:
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed right after the 3rd link, before its unlink
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        organize(csv_path, images, tmp_path / "out", mode="move")
    monkeypatch.setattr(Path, "unlink", real_unlink)
    for n in names:  # every file exists somewhere, intact
        where = [p for p in (images / n, tmp_path / "out" / "x" / n) if p.exists()]
        assert where and all(p.read_bytes() == f"bytes of {n}".encode() for p in where)
    organize(csv_path, images, tmp_path / "out", mode="move")
    assert sorted(p.name for p in (tmp_path / "out" / "x").iterdir()) == names
    assert list(images.iterdir()) == []


def test_partial_copy_of_a_killed_run_is_cleaned_and_redone(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    (tmp_path / "out" / "x").mkdir(parents=True)
    (tmp_path / "out" / "x" / ("a.png" + placing._TMP_SUFFIX)).write_bytes(b"half")
    organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, tmp_path / "out", mode="copy")
    assert [p.name for p in (tmp_path / "out" / "x").iterdir()] == ["a.png"]


def test_move_killed_midway_by_a_signal_then_rerun(tmp_path: Path) -> None:
    """A real SIGKILL while moving 3000 files: nothing lost, the rerun completes."""
    names = [f"f{i:05d}.png" for i in range(3000)]
    images = flat(tmp_path, names)
    csv_path = write_csv(tmp_path / "l.csv", [(n, f"c{i % 7}") for i, n in enumerate(names)])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "organize",
        "--csv",
        str(csv_path),
        "--images",
        str(images),
        "--out",
        str(out),
        "--mode",
        "move",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and sum(1 for _ in out.rglob("*.png")) > 200:
            proc.kill()
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    if proc.returncode != -9:
        pytest.skip("organize finished before it could be killed")
    for i, n in enumerate(names):
        where = [p for p in (images / n, out / f"c{i % 7}" / n) if p.exists()]
        assert where, f"{n} lost"
        assert all(p.read_bytes() == f"bytes of {n}".encode() for p in where)
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert sum(1 for _ in out.rglob("*.png")) == 3000 and not any(images.iterdir())


# ----------------------------------------------------------------------------- reconciling


def classes_of(out: Path) -> dict[str, list[str]]:
    """{file name: [every class folder holding it]} for the organised tree."""
    found: dict[str, list[str]] = {}
    for p in sorted(out.rglob("*.png")):
        found.setdefault(p.name, []).append(p.parent.name)
    return found


@pytest.mark.parametrize("mode", ["link", "copy", "symlink", "move"])
def test_a_changed_label_moves_the_file_and_the_table_matches_the_disk(mode: str, tmp_path: Path) -> None:
    names = [f"img_{i}.png" for i in range(6)]
    images = flat(tmp_path, names)
    rows = [(n, "cat" if i < 3 else "dog") for i, n in enumerate(names)]
    csv_path = write_csv(tmp_path / "l.csv", rows)
    out = tmp_path / "out"
    organize(csv_path, images, out, mode=mode)
    rows[0] = ("img_0.png", "dog")  # the fix a user makes to a mislabelled image
    plan = organize(write_csv(csv_path, rows), images, out, mode=mode)
    assert [p.rel for _, p in plan.relabel] == ["img_0.png"]
    assert classes_of(out) == {n: [lab] for n, lab in rows}  # each image once, under its label
    assert plan.on_disk == {"cat": 2, "dog": 4}
    table = dict(line.split()[:2] for line in org.class_table(plan).splitlines()[1:-1])
    assert table == {"cat": "2", "dog": "4"}
    assert (out / "dog" / "img_0.png").read_bytes() == b"bytes of img_0.png"
    again = organize(csv_path, images, out, mode=mode)  # and it settles
    assert again.changes == 0 and classes_of(out) == {n: [lab] for n, lab in rows}


@pytest.mark.parametrize("mode", ["link", "move"])
def test_rows_dropped_from_the_csv_leave_the_tree_never_the_images(mode: str, tmp_path: Path) -> None:
    names = ["a.png", "b.png", "c.png"]
    images = flat(tmp_path, names)
    out = tmp_path / "out"
    organize(
        write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "x"), ("c.png", "y")]),
        images,
        out,
        mode=mode,
    )
    plan = organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, out, mode=mode)
    assert sorted(p.rel for p in plan.stale) == ["b.png", "c.png"]
    assert classes_of(out) == {"a.png": ["x"]} and not (out / "y").exists()  # emptied class removed
    # nothing is lost: b and c are in the images folder (moved back after a move)
    assert (images / "b.png").read_bytes() == b"bytes of b.png" and (images / "c.png").exists()
    assert plan.on_disk == {"x": 1}


def test_a_file_organize_did_not_place_is_never_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = flat(tmp_path, ["a.png", "b.png"])
    out = tmp_path / "out"
    organize(write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "x")]), images, out, mode="copy")
    (out / "x" / "b.png").unlink()
    (out / "x" / "b.png").write_bytes(b"a user's own file")  # replaces organize's copy
    (out / "x" / "mine.png").write_bytes(b"another user file")
    plan = organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, out, mode="copy")
    assert plan.stale == [] and plan.foreign == [str(out / "x" / "b.png")]
    assert (out / "x" / "b.png").read_bytes() == b"a user's own file" and (out / "x" / "mine.png").exists()
    assert plan.on_disk == {"x": 3} and "left alone" in caplog.text  # the table says what is there


def test_a_replaced_source_image_is_updated_in_the_tree(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    out = tmp_path / "out"
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x")])
    organize(csv_path, images, out)
    (images / "a.png").unlink()
    (images / "a.png").write_bytes(b"a better picture")  # a new file: the old hard link is stale
    plan = organize(csv_path, images, out)
    assert len(plan.update) == 1 and (out / "x" / "a.png").read_bytes() == b"a better picture"


def test_move_keeps_the_source_when_the_destination_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the destination write fails, so the source must still be there."""
    images = flat(tmp_path, ["a.png", "b.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "x")])

    def no_link(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")  # EXDEV: forces the copy path

    def failing_copy(fi: object, fo: object, *a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(placing.shutil, "copyfileobj", failing_copy)
    with pytest.raises(LaunchError, match="No space left"):
        organize(csv_path, images, tmp_path / "out", mode="move")
    assert (images / "a.png").read_bytes() == b"bytes of a.png" and (images / "b.png").exists()
    assert not (tmp_path / "out" / "x" / "a.png").exists()


def test_a_relabelled_and_replaced_copy_converges_in_one_run(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    out = tmp_path / "out"
    organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, out, mode="copy")
    (images / "a.png").write_bytes(b"new pixels")
    organize(write_csv(tmp_path / "l.csv", [("a.png", "y")]), images, out, mode="copy")
    assert classes_of(out) == {"a.png": ["y"]} and (out / "y" / "a.png").read_bytes() == b"new pixels"


def _organize_at(args: tuple, start, results) -> None:
    """One of two organizes started together (a process of its own): puts its error, or ''."""
    start.wait(10)
    try:
        organize(args[0], args[1], args[2], mode=args[3])
    except Exception as e:  # noqa: BLE001 - the test reports whatever broke
        results.put(f"{type(e).__name__}: {e}")
        return
    results.put("")


@pytest.mark.parametrize("mode", ["link", "copy", "move"])
def test_two_organizes_of_one_csv_at_once_both_succeed(tmp_path: Path, mode: str) -> None:
    """Two jobs (or nodes on a shared filesystem) organising the same CSV into the same folder at
    the same moment: both succeed, every file is placed once, whole, and the manifest is complete."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    names = [f"f{i:03d}.png" for i in range(40)]
    for round_ in range(4):
        base = tmp_path / str(round_)
        images = flat(base, names)
        csv_path = write_csv(base / "l.csv", [(n, f"c{i % 3}") for i, n in enumerate(names)])
        start, results = ctx.Barrier(2), ctx.Queue()
        job = (csv_path, images, base / "out", mode)
        procs = [ctx.Process(target=_organize_at, args=(job, start, results)) for _ in range(2)]
        for p in procs:
            p.start()
        errors = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        assert errors == ["", ""], (round_, errors)
        placed = sorted(p.name for p in (base / "out").rglob("*.png"))
        assert placed == names, round_
        assert all(p.read_bytes() == f"bytes of {p.name}".encode() for p in (base / "out").rglob("*.png"))
        assert not list((base / "out").rglob("*" + placing._TMP_SUFFIX)), "a temporary was left"
        assert len((base / "out" / org.MANIFEST).read_text().splitlines()) == len(names) + 1
        if mode == "move":
            assert list(images.iterdir()) == []


def test_cleanup_spares_the_temporaries_of_a_run_still_going(tmp_path: Path) -> None:
    import subprocess

    mine = placing.temporary(tmp_path / "a.png")  # this process: alive
    mine.write_bytes(b"half")
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f"b.png.{__import__('socket').gethostname()}-{dead.pid}-abcdef{placing._TMP_SUFFIX}"
    gone.write_bytes(b"half")
    old = tmp_path / ("c.png" + placing._TMP_SUFFIX)  # the older layout: nobody's
    old.write_bytes(b"half")
    assert placing.cleanup_temporaries(tmp_path) == 2
    assert mine.exists() and not gone.exists() and not old.exists()


def test_the_missing_files_error_names_the_csv_file(tmp_path: Path) -> None:
    images = flat(tmp_path, ["a.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("gone.png", "y")])
    with pytest.raises(LaunchError) as e:
        organize(org.LabelCsv(str(csv_path), "file_name", "label"), images, tmp_path / "out")
    assert f"named in {csv_path} are not in" in str(e.value) and "LabelCsv(" not in str(e.value)


def test_move_reports_moved_not_link(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = flat(tmp_path, ["a.png", "b.png"])
    csv_path = write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "y")])
    with caplog.at_level("INFO", logger="datasets.organize"):
        organize(csv_path, images, tmp_path / "out", mode="move")
    assert "moved 2" in caplog.text and "link" not in caplog.text, caplog.text


def test_a_move_by_another_organize_between_the_plans_two_looks_is_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact interleaving of the CI flake: the plan looks at the place (nothing yet), the other
    organize links the file there and unlinks the source, then the plan looks at the source."""
    images = flat(tmp_path, ["a.png"])
    out = tmp_path / "out"
    src, dst = images / "a.png", out / "c0" / "a.png"
    real_is_file = Path.is_file

    def is_file_after_the_other_move(path: Path) -> bool:
        if path == src and real_is_file(src):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)  # the other organize's move: link first, then unlink the source
            src.unlink()
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", is_file_after_the_other_move)
    plan = org.plan_organize([("a.png", "c0")], images, out)
    assert plan.missing == [] and [p.rel for p in plan.done] == ["a.png"]


def test_a_move_another_organize_finishes_while_this_one_finishes_it_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI flake's interleaving: this organize planned while the other was between its link and
    its unlink (the place filled, the source still there: "a move to finish"); the other unlinks
    the source between this one's check and its own unlink. Both are done, nothing is lost."""
    images = flat(tmp_path, ["a.png"])
    out = tmp_path / "out"
    src, dst = images / "a.png", out / "c0" / "a.png"
    dst.parent.mkdir(parents=True)
    os.link(src, dst)  # the other organize's move, half done: linked, not yet unlinked
    real_same = placing._same_file

    def same_then_the_other_unlinks(a: Path, b: Path) -> bool:
        same = real_same(a, b)
        if a == src and src.exists():
            src.unlink()  # the other organize finishes its move
        return same

    monkeypatch.setattr(placing, "_same_file", same_then_the_other_unlinks)
    org.organize(write_csv(tmp_path / "l.csv", [("a.png", "c0")]), images, out, mode="move")
    assert not src.exists() and dst.read_bytes() == b"bytes of a.png"
    assert len((out / org.MANIFEST).read_text().splitlines()) == 2


def test_a_move_finished_by_another_organize_while_this_one_plans_is_done_not_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan finds the place filled and the source still there (the other organize between its
    link and its unlink); the source goes while the plan compares the two: that is a finished move."""
    images = flat(tmp_path, ["a.png"])
    out = tmp_path / "out"
    src, dst = images / "a.png", out / "c0" / "a.png"
    dst.parent.mkdir(parents=True)
    os.link(src, dst)
    real_same = org._same_file

    def the_other_unlinks_first(a: Path, b: Path) -> bool:
        if a == src and src.exists():
            src.unlink()
        return real_same(a, b)

    monkeypatch.setattr(org, "_same_file", the_other_unlinks_first)
    plan = org.plan_organize([("a.png", "c0")], images, out)
    assert [p.rel for p in plan.done] == ["a.png"] and plan.missing == []


@pytest.mark.parametrize("other", ["half done", "done"])
def test_a_stale_file_another_organize_returns_meanwhile_is_returned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    """After a move, the CSV drops b.png: two organizes both give it back to the images folder.
    The other one's link back (and its unlink, when done) comes between this one's plan and its
    own link back: no error, and the image is whole in the images folder."""
    images = flat(tmp_path, ["a.png", "b.png"])
    out = tmp_path / "out"
    organize(write_csv(tmp_path / "l.csv", [("a.png", "x"), ("b.png", "x")]), images, out, mode="move")
    src, placed = images / "b.png", out / "x" / "b.png"
    assert not src.exists() and placed.exists()
    real_place = placing.place

    def the_other_returns_it_first(p: placing.Placement, mode: str) -> str:
        if p.src == placed and not src.exists():
            os.link(placed, src)
            if other == "done":
                placed.unlink()
        return real_place(p, mode)

    monkeypatch.setattr(placing, "place", the_other_returns_it_first)
    plan = organize(write_csv(tmp_path / "l.csv", [("a.png", "x")]), images, out, mode="move")
    assert [p.rel for p in plan.stale] == ["b.png"]
    assert src.read_bytes() == b"bytes of b.png"
