"""The data pipeline on 2 real gloo ranks: split, exact eval, stats, shards; data commands."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TORCHRUN, clean_env, launch, reference_stats, run, start_launch, tiny, weights
from PIL import Image

from datasets.cache import ENTRY, FILLED
from datasets.transforms import Decoder

pytestmark = [pytest.mark.dist, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 images (odd), 3 classes, mixed sizes, random colours."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(2)
    for i in range(23):
        cls = f"c{i % 3}"
        (root / cls).mkdir(exist_ok=True)
        h, w = (int(v) for v in rng.integers(10, 30, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_two_rank_data_properties(odd_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    res = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "dist" / "data_worker.py"),
            str(odd_folder),
            str(out),
        ],
        env=clean_env(PYTHONPATH=str(REPO)),
        timeout=200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["split_hashes"][0] == r["split_hashes"][1]
    assert r["eval"] == r["eval_alone"] and r["eval"][1] == 23  # every sample once, same accuracy
    paths = sorted(str(p) for p in odd_folder.rglob("*.png"))
    mean, std = reference_stats(paths)
    for w in ("0", "2"):
        got_mean, got_std, images = r["stats"][w]
        assert images == 23
        assert np.allclose(got_mean, mean, atol=1e-9) and np.allclose(got_std, std, atol=1e-9)
    r0, r1 = r["steps"]
    for k in range(min(len(r0), len(r1))):
        if len(r0[k]) == len(r1[k]) == 3:
            assert sorted(r0[k] + r1[k]) == sorted(r["one_rank_steps"][k])
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_stats_command_one_and_two_ranks_agree(odd_folder: Path, tmp_path: Path) -> None:
    one = launch("stats", "--data", str(odd_folder), "--json", "--set", f"run.out_dir={tmp_path}")
    two = launch(
        "stats",
        "--data",
        str(odd_folder),
        "--json",
        "--nproc-per-node",
        "2",
        "--set",
        f"run.out_dir={tmp_path}",
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert set(a) == {"mean", "std", "images", "pixels"} and a["images"] == 23
    assert np.allclose(a["mean"], b["mean"], atol=1e-12) and np.allclose(a["std"], b["std"], atol=1e-12)
    text = launch("stats", "--data", str(odd_folder), "--set", f"run.out_dir={tmp_path}")
    assert "mean of per-image std" in text.stdout and "error" in text.stdout


def test_preview_and_organize_commands(tmp_path: Path) -> None:
    from datasets.synthetic import write_synthetic

    csv_path = write_synthetic(tmp_path / "s", classes=4, per_class=6, size=32)
    org = launch(
        "organize",
        "--csv",
        str(csv_path),
        "--images",
        str(tmp_path / "s" / "images"),
        "--out",
        str(tmp_path / "tree"),
    )
    assert org.returncode == 0, org.stderr
    assert "total" in org.stdout and "24" in org.stdout
    res = launch(
        "preview",
        "--set",
        f"data.root={tmp_path / 'tree'}",
        "--set",
        "data.val_fraction=0.25",
        "--set",
        f"data.stats_cache={tmp_path / 'stats'}",
        "--set",
        f"run.out_dir={tmp_path / 'r'}",
        "--set",
        "run.name=p",
    )
    assert res.returncode == 0, res.stderr
    png = tmp_path / "r" / "p" / "preview.png"
    img = Image.open(png)
    assert img.size[0] >= 4 * 192 and "disc" in res.stderr
    arr = np.asarray(img)
    assert arr.std() > 10  # not a blank sheet
    classes = json.loads((tmp_path / "r" / "p" / "classes.json").read_text())
    assert classes["classes"] == ["cross", "disc", "square", "triangle"]
    assert classes["class_to_idx"]["disc"] == 1


def test_bench_data_smoke(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / f"c{i % 2}" / f"{i}.jpg"
        )  # JPEG: the fast_jpeg on/off pair runs too
    res = launch(
        "bench",
        "data",
        "--data",
        str(root),
        "--repeats",
        "1",
        "--size",
        "32",
        "--batch",
        "4",
        "--workers",
        "1",
        "--set",
        f"run.out_dir={tmp_path / 'r'}",
        "--set",
        "run.name=b",
        timeout=200,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "r" / "b" / "bench.json").read_text())
    assert {r["variant"] for r in data["summary"]} == {
        "a_recipe",
        "b_ours",
        "c_floor",
        "d_ours_cached",
        "b_ours_full_jpeg",
        "naive_stats_s",
        "exact_stats_s",
        "exact_stats_cached_s",
        "decode_fast_jpeg_ms",
        "decode_full_jpeg_ms",
    }
    assert set(data["meta"]["ratios"]) == {
        "ours_vs_recipe",
        "ours_vs_floor",
        "cached_vs_recipe",
        "stats_speedup",
        "cached_stats_speedup",
        "fast_jpeg_vs_full_decode",
        "fast_jpeg_decode_stage",
    }
    assert all(r["median"] > 0 for r in data["summary"])
    assert not list((tmp_path / "r" / "b").glob("decoded-cache-*"))  # the bench's cache is removed


def test_data_commands_bad_input(tmp_path: Path) -> None:
    res = launch("stats", "--data", str(tmp_path / "absent"), "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "l.csv").write_text("image,cls\na.png,x\n")
    (tmp_path / "imgs").mkdir()
    res = launch(
        "organize",
        "--csv",
        str(tmp_path / "l.csv"),
        "--images",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "o"),
    )
    assert res.returncode == 2 and "columns found: 'image', 'cls'" in res.stderr
    assert "Traceback" not in res.stderr
    (tmp_path / "empty.toml").write_text("")
    res = launch("preview", "--config", str(tmp_path / "empty.toml"), "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and "no data configured" in res.stderr


@pytest.fixture(scope="module")
def same_size_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """21 images of one size, 3 classes, random colours."""
    root = tmp_path_factory.mktemp("same")
    rng = np.random.default_rng(4)
    for i in range(21):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            root / f"c{i % 3}" / f"{i}.png"
        )
    return root


def test_two_ranks_fill_one_cache_and_batches_match_the_uncached_ones(
    same_size_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    worker = str(REPO / "tests" / "dist" / "cache_worker.py")
    res = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            worker,
            str(same_size_folder),
            str(tmp_path / "c"),
            str(out),
        ],
        env=clean_env(PYTHONPATH=str(REPO)),
        timeout=200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    r0, r1 = r["ranks"]
    assert r0["same"] and r1["same"], "cached batches differ from decoded ones"
    assert r0["folder"] == r1["folder"] and len(r["folders"]) == 1, r["folders"]  # one file for the node
    assert not set(r0["first"]) & set(r1["first"])  # each rank filled its own shard ...
    assert r["filled"] == len(set(r0["seen"]) | set(r1["seen"]))  # ... into the same file


def test_a_cache_fill_killed_midway_is_completed_by_a_rerun_and_never_half_read(
    same_size_folder: Path, tmp_path: Path
) -> None:
    """SIGKILL `launch.py cache` while it writes; every slot it marked filled holds the full image."""
    args = ["cache", "--set", f"data.root={same_size_folder}", "--set", f"data.cache_dir={tmp_path / 'c'}",
            "--set", f"run.out_dir={tmp_path / 'runs'}"]  # fmt: skip
    slow = clean_env(PYTHONPATH=str(REPO / "tests" / "fakes" / "slowdecode"))  # 50 ms per image
    proc = start_launch(args, slow)
    try:
        deadline = time.monotonic() + 60
        entries = None
        while time.monotonic() < deadline:
            found = list((tmp_path / "c").glob("decoded-*/entries.i64"))
            if found:
                entries = np.fromfile(found[0], dtype=np.int64).reshape(-1, ENTRY)
                if 3 <= (entries[:, 0] == FILLED).sum() < len(entries):
                    break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (folder,) = (tmp_path / "c").glob("decoded-*")
    entries = np.fromfile(folder / "entries.i64", dtype=np.int64).reshape(-1, ENTRY)
    filled = entries[:, 0] == FILLED
    assert 0 < filled.sum() < len(entries), "the kill did not land mid-fill"
    paths = np.load(folder / "paths.npy")
    pixels = np.fromfile(folder / "pixels.u8", dtype=np.uint8).reshape(len(paths), 3, 20, 24)
    decode = Decoder()
    for slot in np.flatnonzero(filled):
        assert np.array_equal(pixels[slot], decode(str(paths[slot])).numpy()), f"slot {slot} half-written"
    res = launch(*args, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(paths) - filled.sum()} image(s) decoded in" in res.stderr, res.stderr[-2000:]
    entries = np.fromfile(folder / "entries.i64", dtype=np.int64).reshape(-1, ENTRY)
    pixels = np.fromfile(folder / "pixels.u8", dtype=np.uint8).reshape(len(paths), 3, 20, 24)
    assert (entries[:, 0] == FILLED).all()
    assert all(np.array_equal(pixels[s], decode(str(paths[s])).numpy()) for s in range(len(paths)))


def test_training_with_the_decoded_cache_ends_where_training_without_it_does(
    demo: Path, tmp_path: Path
) -> None:
    """2 ranks, 2 workers each, 2 epochs: the first fills the cache, the second reads it."""
    import torch

    sets = ("train.epochs=2", "data.num_workers=2", "data.resize=[24, 24]", "data.hflip=0.5")
    off = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "off", *sets), timeout=200)
    assert off.returncode == 0, off.stderr[-3000:]
    cached = (*sets, "data.cache=disk", f"data.cache_dir={tmp_path / 'c'}")
    on = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "on", *cached), timeout=200)
    assert on.returncode == 0, on.stderr[-3000:]
    assert "decoded cache" in on.stderr and "120 image(s) of 24x24" in on.stderr, on.stderr[-2000:]
    a, b = weights(tmp_path / "off"), weights(tmp_path / "on")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / n / "metrics.csv").read_text() for n in ("off", "on")]
    assert metrics[0].splitlines()[1:] and [r.split(",")[:5] for r in metrics[0].splitlines()] == [
        r.split(",")[:5] for r in metrics[1].splitlines()
    ]


def test_a_damaged_decoded_cache_trains_as_the_cache_off_does(demo: Path, tmp_path: Path) -> None:
    """Truncated, overwritten or its meta.json deleted between runs (other damage: test_cache.py):
    the rerun warns, decodes again, and ends with the weights and val_acc of training without it."""
    import torch

    sets = ("train.epochs=1", "data.resize=[24, 24]")
    off = launch("train", *tiny(demo, tmp_path, "off", *sets))
    assert off.returncode == 0, off.stderr[-3000:]
    cached = (*sets, "data.cache=disk", f"data.cache_dir={tmp_path / 'c'}", "run.overwrite=true")
    fill = launch("train", *tiny(demo, tmp_path, "on", *cached))
    assert fill.returncode == 0, fill.stderr[-3000:]
    (folder,) = (tmp_path / "c").glob("decoded-*")
    reference = json.loads((tmp_path / "off" / "summary.json").read_text())
    pixels = folder / "pixels.u8"
    damages = {
        "truncated": lambda: os.truncate(pixels, pixels.stat().st_size // 2),
        "overwritten": lambda: pixels.write_bytes(b"\x07" * pixels.stat().st_size),
        "meta deleted": lambda: (folder / "meta.json").unlink(),
    }  # fmt: skip
    for what, do in damages.items():
        do()
        res = launch("train", *tiny(demo, tmp_path, "on", *cached))
        assert res.returncode == 0, (what, res.stderr[-3000:])
        assert "damaged" in res.stderr or "fail their checksum" in res.stderr, (what, res.stderr[-2000:])
        summary = json.loads((tmp_path / "on" / "summary.json").read_text())
        assert summary["val_acc"] == reference["val_acc"], what
        a, b = weights(tmp_path / "off"), weights(tmp_path / "on")
        assert all(torch.equal(a[k], b[k]) for k in a), what


def _term_when(args: list[str], env: dict[str, str], ready, timeout: float = 60) -> tuple[int, str, float]:
    """Start ``launch.py *args`` (forked by the fork server where it can be), send
    SIGTERM to it (not its group: as the kernel or an agent would) once ``ready(output so far)``
    holds; its exit code, output (stderr and stdout), and the seconds from signal to exit."""
    import threading

    proc = start_launch(args, env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready("".join(lines)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "it ended before the signal: " + "".join(lines)[-2000:]
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, "".join(lines), took


def test_sigterm_in_the_stats_pass_the_cache_fill_and_organize_is_prompt_and_one_line(
    demo: Path, tmp_path: Path
) -> None:
    slow = clean_env(PYTHONPATH=str(REPO / "tests" / "fakes" / "slowdecode"))  # 50 ms per decode
    # 1. the exact-stats pass before the first epoch (120 images x 50 ms): stops within a second or two
    sets = tiny(demo, tmp_path, "t", f"data.stats_cache={tmp_path / 'stats'}")
    code, err, took = _term_when(["train", *sets], slow,
                                 lambda e: "computing exact dataset stats" in e)  # fmt: skip
    assert code == 143 and took < 3, (code, took, err[-2000:])
    assert "stopped on SIGTERM during the dataset stats pass" in err and "Traceback" not in err, err[-2000:]
    assert not list((tmp_path / "stats").glob("stats-*.json")), "partial stats were cached"
    # 2. launch.py cache, mid-fill: one line with what is cached, and a rerun continues
    cache = tmp_path / "c"
    args = ["cache", *tiny(demo, tmp_path, "c", f"data.cache_dir={cache}")]

    def filling(_: str) -> bool:
        found = list(cache.glob("decoded-*/entries.i64"))
        return (
            bool(found)
            and (np.fromfile(found[0], dtype=np.int64).reshape(-1, ENTRY)[:, 0] == FILLED).sum() >= 3
        )

    code, err, took = _term_when(args, slow, filling)
    assert code == 143 and took < 3, (code, took, err[-2000:])
    assert "stopped on SIGTERM: this rank decoded" in err and "a rerun" in err, err[-2000:]
    assert "Traceback" not in err and err.count("stopped on SIGTERM") == 1, err[-2000:]
    # 3. organize, between two files: 1000 fsynced copies
    names = [f"f{i:05d}.png" for i in range(1000)]
    (tmp_path / "flat").mkdir()
    for n in names:
        (tmp_path / "flat" / n).write_bytes(b"x" * 2000)
    (tmp_path / "l.csv").write_text(
        "file_name,label\n" + "".join(f"{n},c{i % 5}\n" for i, n in enumerate(names))
    )
    out = tmp_path / "out"
    args = ["organize", "--csv", str(tmp_path / "l.csv"), "--images", str(tmp_path / "flat"),
            "--out", str(out), "--mode", "copy"]  # fmt: skip
    code, err, took = _term_when(
        args, clean_env(), lambda _: (out / "c4").is_dir() and any((out / "c4").iterdir())
    )
    assert code == 143 and took < 3, (code, took, err[-2000:])
    assert "organize stopped on SIGTERM after placing" in err and "a rerun places the rest" in err, err
    assert "Traceback" not in err
    again = launch("organize", "--csv", str(tmp_path / "l.csv"), "--images", str(tmp_path / "flat"), "--out",
                   str(out), "--mode", "copy")  # fmt: skip
    assert again.returncode == 0 and sorted(p.name for p in out.rglob("*.png")) == names, again.stderr[-2000:]
