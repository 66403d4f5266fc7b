"""The data pipeline on 2 real gloo ranks: split, exact eval, stats, shards; data commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TORCHRUN, clean_env, launch, reference_stats, run
from PIL import Image

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
            root / f"c{i % 2}" / f"{i}.png"
        )
    res = launch(
        "bench",
        "data",
        "--data",
        str(root),
        "--repeats",
        "1",
        "--size",
        "64",
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
        "naive_stats_s",
        "exact_stats_s",
    }
    assert set(data["meta"]["ratios"]) == {"ours_vs_recipe", "ours_vs_floor", "stats_speedup"}
    assert all(r["median"] > 0 for r in data["summary"])


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
