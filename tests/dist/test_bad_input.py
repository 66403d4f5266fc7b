"""No silent wrong results, through the real CLI: every case exits 2 with one message and no traceback,
or does the right thing and says so."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import flip_inside_largest_tensor, launch, tiny, weights

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def base(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run (small_cnn width 8) with both epochs' checkpoints kept."""
    out = tmp_path_factory.mktemp("runs")
    res = launch("train", *tiny(demo, out, "base", "train.epochs=2", "checkpoint.keep_last=5"))
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "base"


def refused(res, *needles: str) -> None:
    """Exit 2, one error message holding every needle, no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Error:" not in res.stderr.replace("ERROR:", ""), res.stderr
    errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-2000:])


# ----------------------------------------------------------------------------- 1. stale organised labels


def organised(cache: Path) -> dict[str, list[str]]:
    """{image file: [class folders holding it]} of the single organised tree under ``cache``."""
    (tree,) = [p for p in cache.iterdir() if p.is_dir()]
    found: dict[str, list[str]] = {}
    for p in sorted(tree.rglob("*.png")):
        found.setdefault(p.name, []).append(p.parent.name)
    return found


def test_editing_the_label_csv_retrains_on_the_new_labels(demo: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    shutil.copy(demo / "src" / "labels.csv", labels)
    sets = [f"data.csv={labels}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]
    assert launch("train", *tiny(demo, tmp_path, "first", *sets)).returncode == 0
    rows = list(csv.reader(labels.open()))
    old = rows[1][1]
    rows[1][1] = next(r[1] for r in rows[2:] if r[1] != old)  # the user fixes one label
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    res = launch("train", *tiny(demo, tmp_path, "second", *sets))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 file(s) changed label since the last organize" in res.stderr
    assert organised(tmp_path / "cache") == {name: [label] for name, label in rows[1:]}  # 120, each once


def test_organize_cli_rerun_reconciles_and_its_table_is_the_disk(demo: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    shutil.copy(demo / "src" / "labels.csv", labels)
    out = tmp_path / "tree"
    args = ["organize", "--csv", str(labels), "--images", str(demo / "src" / "images"), "--out", str(out)]
    assert launch(*args).returncode == 0
    rows = list(csv.reader(labels.open()))
    moved_from = rows[1][1]
    rows[1][1] = next(r[1] for r in rows[2:] if r[1] != moved_from)
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows[:-1])  # one label changed, the last row dropped
    res = launch(*args)
    assert res.returncode == 0, res.stderr
    table = {ln.split()[0]: int(ln.split()[1]) for ln in res.stdout.splitlines()[1:-1]}
    on_disk = {d.name: len(list(d.iterdir())) for d in out.iterdir() if d.is_dir()}
    assert table == on_disk and sum(on_disk.values()) == 119
    assert (demo / "src" / "images" / rows[-1][0]).exists()  # dropped from the tree, never from --images


# ----------------------------------------------------------------------------- 2. weights that load nothing


def test_weights_of_another_width_are_refused_unless_asked(demo: Path, base: Path, tmp_path: Path) -> None:
    best = base / "checkpoints" / "best.pt"
    res = launch("train", *tiny(demo, tmp_path, "w", "model.width=16", f"model.weights={best}"))
    refused(
        res,
        f"model.weights {best} does not fit",
        "features.0.weight [8, 3, 3, 3] in the file, [16, 3, 3, 3]",
        "model.weights_strict = false",
    )
    res = launch(
        "train",
        *tiny(
            demo,
            tmp_path,
            "w2",
            "model.width=16",
            f"model.weights={best}",
            "model.weights_strict=false",
            "train.max_steps=1",
        ),
    )
    assert res.returncode == 0 and "weights: loaded 1 of 8 learned tensor(s)" in res.stderr, res.stderr[
        -2000:
    ]


# ----------------------------------------------------------------------------- 3. corrupt checkpoints


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is corrupt or truncated"),
        ("flipped", "fails its integrity check"),
        ("code", "holds pickled Python objects (it refers to posix.system)"),
    ],
)
def test_damaged_checkpoints_are_one_clear_line(
    damage: str, needle: str, demo: Path, base: Path, tmp_path: Path
) -> None:
    bad = tmp_path / f"{damage}.pt"
    shutil.copy(base / "checkpoints" / "best.pt", bad)
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-2000])
    elif damage == "flipped":
        flip_inside_largest_tensor(bad, 2000)
        torch.load(bad, weights_only=True)  # the silent kind: torch alone loads it
    else:
        torch.save({"format": 2, "model": _Evil()}, bad)
    refused(launch("train", *tiny(demo, tmp_path, "r"), "--resume", str(bad)), needle, str(bad))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_auto_skips_a_damaged_newest_checkpoint(demo: Path, base: Path, tmp_path: Path) -> None:
    shutil.copytree(base, tmp_path / "base")
    ckpts = sorted((tmp_path / "base" / "checkpoints").glob("ckpt-*.pt"))
    flip_inside_largest_tensor(ckpts[-1])
    res = launch(
        "train", *tiny(demo, tmp_path, "base", "train.epochs=2", "checkpoint.keep_last=5"), "--resume", "auto"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"skipping {ckpts[-1].name}" in res.stderr and "fails its integrity check" in res.stderr
    assert f"resumed from {ckpts[0]} at epoch 2, sample 0" in res.stderr


# ----------------------------------------------------------------------------- 4. a reused run name


def test_a_reused_run_name_is_refused_and_changes_nothing(demo: Path, base: Path, tmp_path: Path) -> None:
    shutil.copytree(base, tmp_path / "base")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "base").rglob("*")}
    res = launch("train", *tiny(demo, tmp_path, "base", "train.epochs=1"))
    refused(res, f"run directory {tmp_path / 'base'} already holds a run", "--resume auto", "run.overwrite")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "base").rglob("*")} == before
    res = launch("train", *tiny(demo, tmp_path, "base", "train.epochs=1", "run.overwrite=true"))
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "base" / "checkpoints").iterdir())
    assert names == ["best.pt", "ckpt-00000010.pt"]  # the first run's ckpt-20 is gone with it
    rows = list(csv.DictReader((tmp_path / "base" / "metrics.csv").open()))
    assert len(rows) == 2  # one epoch: this run's rows only


# ----------------------------------------------------------------------------- 5. out-of-range values


@pytest.mark.parametrize(
    "item, needle",
    [
        ("optim.momentum=-1", "optim.momentum = -1 is out of range: must be in [0, 1]"),
        ("optim.weight_decay=-1", "optim.weight_decay = -1 is out of range: must be >= 0"),
        ("model.width=0", "model.width = 0 is out of range: must be >= 1"),
        ("data.std=[0,0,0]", "data.std = [0, 0, 0] is out of range"),
        ("dist.timeout_s=0", "dist.timeout_s = 0 is out of range: must be > 0"),
        ("dist.timeout_s=-5", "dist.timeout_s = -5 is out of range: must be > 0"),
        ("data.batch_size=-1", "data.batch_size = -1 is out of range: must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_before_any_worker(item: str, needle: str, tmp_path: Path) -> None:
    refused(launch("train", "--set", item, "--set", f"run.out_dir={tmp_path}"), needle)
    assert not any(tmp_path.iterdir())  # no run directory: nothing started


def test_a_negative_seed_trains(demo: Path, tmp_path: Path) -> None:
    res = launch("train", *tiny(demo, tmp_path, "neg", "run.seed=-1", "train.max_steps=2"))
    assert res.returncode == 0, res.stderr[-2000:]


def test_log_ranks_beyond_the_world_is_refused(tmp_path: Path) -> None:
    res = launch("check", "--nproc-per-node", "2", "--log-ranks", "5", "--set", f"run.out_dir={tmp_path}")
    refused(res, "--log-ranks '5': rank 5 does not exist in this job of 2 rank(s)")


def test_resuming_with_another_width_names_the_key(demo: Path, base: Path, tmp_path: Path) -> None:
    res = launch(
        "train",
        *tiny(demo, tmp_path, "x", "model.width=16"),
        "--resume",
        str(base / "checkpoints" / "best.pt"),
    )
    refused(res, "model.width = 8 in the checkpoint, 16 now")


def test_preview_out_under_a_file(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    res = launch("preview", *tiny(demo, tmp_path, "p"), "--out", str(tmp_path / "file" / "p.png"))
    refused(res, f"{tmp_path / 'file'} is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_more_cpu_ranks_than_cores_is_a_warning_with_the_figure(tmp_path: Path) -> None:
    n = (os.cpu_count() or 1) + 1
    res = launch(
        "check",
        "--nproc-per-node",
        str(n),
        "--set",
        f"run.out_dir={tmp_path}",
        "--set",
        "data.num_workers=0",
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"--nproc-per-node {n} starts {n} CPU processes on {os.cpu_count()} CPU core(s)" in res.stderr


# ----------------------------------------------------------------------------- 7. resume with dropout


def test_resume_restores_the_rng_a_dropout_model_draws_from(demo: Path, tmp_path: Path) -> None:
    """Dropout draws from the process RNG: a resume that skipped restoring it would diverge."""
    sets = ("model.dropout=0.5", "train.epochs=2", "checkpoint.keep_last=10")
    assert launch("train", *tiny(demo, tmp_path, "full", *sets)).returncode == 0
    assert launch("train", *tiny(demo, tmp_path, "cut", *sets, "train.max_steps=14")).returncode == 0
    res = launch("train", *tiny(demo, tmp_path, "cut", *sets), "--resume", "auto")
    assert res.returncode == 0 and "at epoch 2, sample 32, step 14" in res.stderr, res.stderr[-2000:]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    nodrop = launch("train", *tiny(demo, tmp_path, "nodrop", "train.epochs=2"))
    assert nodrop.returncode == 0
    assert not all(torch.equal(a[k], v) for k, v in weights(tmp_path / "nodrop").items())  # dropout did act


# ----------------------------------------------------------------------------- permissions


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is root's alone), removed afterwards."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="perm-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(folder)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """launch.py without privileges (`unshare -U`: still the files' owner, but without the capability
    that lets root ignore permission bits; so a mode without the owner's bits denies it)."""
    return launch(*args, timeout=120, unprivileged=True)


def test_unreadable_and_unwritable_paths_are_one_line_each(shared_tmp: Path) -> None:
    if subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -U (an unprivileged user namespace) is not allowed here")
    from PIL import Image

    root = shared_tmp / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 90, 9)).save(root / c / f"{i}.png")
    for p in [shared_tmp, root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = shared_tmp / "runs"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    stats = shared_tmp / "stats"
    stats.mkdir()
    stats.chmod(0o555)  # nobody may write there
    sets = ["--set", f"data.root={root}", "--set", f"data.val_root={root}", "--set", f"run.out_dir={out}",
            "--set", "data.batch_size=4"]  # fmt: skip
    sets = [*sets, "--set", "data.num_workers=2", "--set", "train.epochs=1"]
    res = as_nobody("train", *sets, "--set", f"data.stats_cache={stats}")
    refused(res, f"data.stats_cache {stats} is not writable (Permission denied)", "set data.stats_cache")
    assert "computing exact dataset stats" not in res.stderr, "the pass ran before the check"
    writable = ["--set", f"data.stats_cache={out / 's'}"]
    (root / "b" / "2.png").chmod(0o044)
    refused(as_nobody("train", *sets, *writable), f"cannot read {root / 'b' / '2.png'}: Permission denied")
    (root / "b").chmod(0o055)
    refused(
        as_nobody("train", *sets, *writable), "cannot read 1 folder(s)", f"{root / 'b'} (Permission denied)"
    )
    root.chmod(0o055)
    refused(as_nobody("train", *sets, *writable), f"cannot read image folder {root}: Permission denied")


# ----------------------------------------------------------------------------- newer commands


@pytest.mark.parametrize(
    "args, needles",
    [
        (["bench", "parallel", "--steps", "0"], ["bench parallel --steps 0: must be a positive integer"]),
        (["bench", "parallel", "--steps", "-1"], ["--steps -1: must be a positive integer"]),
        (["bench", "parallel", "--warmup", "-1"], ["--warmup -1: must be an integer >= 0"]),
        (
            ["bench", "parallel", "--image-size", "3"],
            ["small_cnn cannot take 3 x 3 px", "--image-size 8 or more"],
        ),
        (["run", "-m", "no_such_module"], ["-m no_such_module: no module named 'no_such_module'"]),
        (["run", "--nproc-per-node", "2", "-m", "no_such_module"], ["no module named 'no_such_module'"]),
    ],
    ids=["steps-0", "steps-neg", "warmup-neg", "image-size-3", "run-m", "run-m-2-ranks"],
)
def test_bad_values_for_the_newer_commands_are_one_line(
    args: list[str], needles: list[str], tmp_path: Path
) -> None:
    res = launch(*args, "--set", f"run.out_dir={tmp_path}")
    refused(res, *needles)
    assert not list(tmp_path.iterdir()), "a refused start left a run directory"


def test_a_bad_image_in_the_size_scan_of_the_cache_is_one_line_or_skipped(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 40, 90, 9)).save(tmp_path / "d" / c / f"{i}.png")
    (tmp_path / "d" / "b" / "3.png").write_bytes(b"")  # zero bytes
    d = tmp_path / "d"
    sets = ["--set", f"data.root={d}", "--set", f"data.val_root={d}", "--set", "data.cache=disk",
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", f"run.out_dir={tmp_path / 'r'}",
            "--set", "data.batch_size=4", "--set", "train.epochs=1", "--set", "data.mean=0.5,0.5,0.5",
            "--set", "data.std=0.25,0.25,0.25"]  # fmt: skip
    refused(launch("train", *sets), "cannot read the size of", "3.png", "set data.on_bad_image = 'skip'")
    assert not list((tmp_path / "r").iterdir()), "a refused start left a run directory holding config.toml"
    skipped = launch("train", *sets, "--set", "data.on_bad_image=skip", "--set", "run.name=s")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "skipping cannot read the size of" in skipped.stderr
    assert (tmp_path / "r" / "s" / "bad_images.txt").read_text().count("3.png") >= 1


def test_a_ranks_user_error_is_printed_once_under_our_launcher(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16 + i, 16), (9, 9, 9)).save(tmp_path / "d" / c / f"{i}.png")
    d = tmp_path / "d"
    res = launch("train", "--nproc-per-node", "2", "--set", f"data.root={d}", "--set", f"data.val_root={d}",
                 "--set", "data.cache=disk", "--set", f"data.cache_dir={tmp_path / 'c'}", "--set",
                 f"run.out_dir={tmp_path / 'r'}", "--set", "data.batch_size=2")  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("stores images of one size, and these differ") == 1, res.stderr
    assert "[launcher] ERROR: worker rank" in res.stderr and "its error is above" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not list((tmp_path / "r").iterdir())


def test_a_missing_resume_checkpoint_is_refused_before_any_data_work(demo: Path, tmp_path: Path) -> None:
    res = launch("train", *tiny(demo, tmp_path, "r", f"data.stats_cache={tmp_path / 's'}"),
                 "--resume", str(tmp_path / "nope.pt"))  # fmt: skip
    refused(res, f"checkpoint {tmp_path / 'nope.pt'} does not exist")
    assert "computing exact dataset stats" not in res.stderr and not (tmp_path / "r").exists()
