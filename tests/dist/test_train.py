"""The training engine end to end: real runs on CPU, 1 and 2 gloo ranks."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH, TORCHRUN, launch, run, tiny, weights

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def losses(run_dir: Path) -> list[float]:
    with (run_dir / "steps.csv").open() as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_default_job_single_and_two_processes(tmp_path: Path) -> None:
    """`python launch.py` as shipped (its data written under tmp): <= 3 min, val_acc >= 0.95."""
    data = [
        f"data.csv={tmp_path / 'demo' / 'labels.csv'}",
        f"data.images={tmp_path / 'demo' / 'images'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.stats_cache={tmp_path / 'stats'}",
    ]
    for extra, name in (([], "one"), (["--nproc-per-node", "2"], "two")):
        start = time.monotonic()
        sets = [
            a for s in [*data, f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}"] for a in ("--set", s)
        ]
        res = launch(*extra, *sets, timeout=200)
        assert res.returncode == 0, res.stderr[-3000:]
        assert time.monotonic() - start < 180
        out = tmp_path / "runs" / name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["val_acc"] >= 0.95 and summary["epochs"] == 8
        assert summary["world_size"] == (2 if extra else 1) and summary["images_per_s"] > 0
        check = summary["timing"]["straggler_check"]  # "no straggler" only where ranks were compared
        assert check.endswith("episode(s)") if extra else check == "not judged: one rank", check
        for f in ("metrics.csv", "preview.png", "classes.json", "config.toml", "steps.csv"):
            assert (out / f).exists(), f
        assert (out / "checkpoints" / "best.pt").exists()
        assert len(list((out / "checkpoints").glob("ckpt-*.pt"))) == 2  # keep_last
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        assert [(r["epoch"], r["split"]) for r in rows[:2]] == [("0", "train"), ("0", "val")] and len(
            rows
        ) == 16


def test_world_size_invariance(demo: Path, tmp_path: Path) -> None:
    """2 ranks x batch B (DDP) end with the weights of 1 rank x batch 2B after K steps."""
    one = launch("train", *tiny(demo, tmp_path, "one", "data.batch_size=16", "train.max_steps=5"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            LAUNCH,
            "train",
            *tiny(demo, tmp_path, "two", "data.batch_size=8", "train.max_steps=5"),
        ]
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    # the two runs really trained: the loss moved
    assert losses(tmp_path / "one")[-1] < losses(tmp_path / "one")[0]


def test_same_seed_bit_identical_and_exact_resume(demo: Path, tmp_path: Path) -> None:
    """Two runs, and runs stopped after epoch 1 or mid-epoch then resumed: identical weights."""
    base = ("data.num_workers=2", "checkpoint.keep_last=10")
    for name in ("a", "b"):
        assert launch("train", *tiny(demo, tmp_path, name, *base)).returncode == 0
    ref = weights(tmp_path / "a")
    assert all(torch.equal(ref[k], v) for k, v in weights(tmp_path / "b").items())
    steps_per_epoch = json.loads((tmp_path / "a" / "summary.json").read_text())["global_step"] // 3
    for name, stop in (("epoch", steps_per_epoch), ("mid", steps_per_epoch + 3)):
        first = launch("train", *tiny(demo, tmp_path, name, *base, f"train.max_steps={stop}"))
        assert first.returncode == 0, first.stderr[-2000:]
        ckpt = sorted((tmp_path / name / "checkpoints").glob("ckpt-*.pt"))[-1]
        assert ckpt.name == f"ckpt-{stop:08d}.pt"
        again = launch("train", *tiny(demo, tmp_path, name, *base), "--resume", str(ckpt))
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resumed from" in again.stderr
        got = weights(tmp_path / name)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
        a_rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
        got_rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[:5] for r in got_rows] == [r.split(",")[:5] for r in a_rows]


def test_dp_and_ddp_give_the_same_losses(demo: Path, tmp_path: Path) -> None:
    dp = launch(
        "train", *tiny(demo, tmp_path, "dp", "parallel.mode=dp", "data.batch_size=16", "train.max_steps=5")
    )
    assert dp.returncode == 0, dp.stderr[-2000:]
    assert "DataParallel on the CPU: a plain module call" in dp.stderr
    ddp = run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            LAUNCH,
            "train",
            *tiny(demo, tmp_path, "ddp", "parallel.mode=ddp", "data.batch_size=8", "train.max_steps=5"),
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = losses(tmp_path / "dp"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b, strict=True)), (a, b)


def test_dp_is_refused_in_a_multi_process_world(demo: Path, tmp_path: Path) -> None:
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "x", "parallel.mode=dp"))
    assert res.returncode != 0 and "parallel.mode = 'dp'" in res.stderr


def test_eval_one_and_two_ranks_agree(demo: Path, tmp_path: Path) -> None:
    assert launch("train", *tiny(demo, tmp_path, "t", "train.epochs=1")).returncode == 0
    ckpt = tmp_path / "t" / "checkpoints" / "best.pt"
    outs = []
    for extra, name in (([], "e1"), (["--nproc-per-node", "2"], "e2")):
        res = launch(
            "eval",
            "--checkpoint",
            str(ckpt),
            *extra,
            "--set",
            f"run.out_dir={tmp_path}",
            "--set",
            f"run.name={name}",
        )
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(tmp_path / name)
    e1, e2 = (json.loads((o / "eval.json").read_text()) for o in outs)
    assert e1 == e2 and e1["images"] == 36
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert abs(e1["accuracy"] - summary["val_acc"]) < 1e-12
    assert (outs[0] / "confusion.csv").read_text() == (outs[1] / "confusion.csv").read_text()
    p1, p2 = ([r[:3] for r in csv.reader((o / "predictions.csv").open())] for o in outs)
    assert p1 == p2 and len(p1) == 37


# ----------------------------------------------------------------------------- bad input


def test_resuming_another_model_or_class_count(demo: Path, tmp_path: Path) -> None:
    assert launch("train", *tiny(demo, tmp_path, "r", "train.epochs=1")).returncode == 0
    ckpt = str(tmp_path / "r" / "checkpoints" / "best.pt")
    res = launch("train", *tiny(demo, tmp_path, "r2", "model.name=resnet18"), "--resume", ckpt)
    assert res.returncode == 2 and "holds model 'small_cnn', this run builds 'resnet18'" in res.stderr
    from datasets.synthetic import write_synthetic

    write_synthetic(tmp_path / "three", classes=3, per_class=10, size=32)
    res = launch(
        "train",
        *tiny(demo, tmp_path, "r3"),
        "--set",
        f"data.csv={tmp_path / 'three' / 'labels.csv'}",
        "--set",
        f"data.images={tmp_path / 'three' / 'images'}",
        "--resume",
        ckpt,
    )
    assert res.returncode == 2 and "trained on 4 classes" in res.stderr and "has 3" in res.stderr


def test_corrupt_checkpoint(demo: Path, tmp_path: Path) -> None:
    assert launch("train", *tiny(demo, tmp_path, "c", "train.epochs=1")).returncode == 0
    bad = tmp_path / "broken.pt"
    data = (tmp_path / "c" / "checkpoints" / "best.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    res = launch("train", *tiny(demo, tmp_path, "c2"), "--resume", str(bad))
    assert res.returncode == 2 and "corrupt or truncated" in res.stderr and str(bad) in res.stderr
    res = launch("eval", "--checkpoint", str(bad), "--set", f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and "corrupt or truncated" in res.stderr


def test_unwritable_checkpoint_folder_fails_before_training(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    res = launch("train", *tiny(demo, tmp_path, "u", f"checkpoint.dir={tmp_path / 'file' / 'ck'}"))
    assert res.returncode == 2 and "not writable" in res.stderr
    assert not (tmp_path / "u" / "steps.csv").exists()


def test_non_finite_loss_stops_every_rank_naming_step_rank_and_lr(demo: Path, tmp_path: Path) -> None:
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "nan", "optim.lr=1e12"))
    assert res.returncode != 0
    assert "non-finite value" in res.stderr and "learning rate 1e+12" in res.stderr
    assert "on rank" in res.stderr and "step" in res.stderr


def test_a_global_batch_larger_than_the_training_set_is_refused(demo: Path, tmp_path: Path) -> None:
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "big", "data.batch_size=64"))
    assert res.returncode == 2 and "global batch of 128 images (data.batch_size 64 x 2 rank(s)" in res.stderr
    assert "larger than the 84 training images" in res.stderr and "Traceback" not in res.stderr


def test_one_class_is_refused(tmp_path: Path) -> None:
    from datasets.synthetic import write_synthetic

    write_synthetic(tmp_path / "one", classes=1, per_class=6, size=16)
    res = launch(
        "train",
        "--set",
        f"data.csv={tmp_path / 'one' / 'labels.csv'}",
        "--set",
        f"data.images={tmp_path / 'one' / 'images'}",
        "--set",
        f"data.cache_dir={tmp_path / 'c'}",
        "--set",
        f"run.out_dir={tmp_path}",
    )
    assert res.returncode == 2 and "single class" in res.stderr


def test_accumulation_matches_the_larger_batch_and_resume_auto(demo: Path, tmp_path: Path) -> None:
    """2 micro-batches of B with accumulation == one batch of 2B; resume auto picks the newest."""
    big = launch("train", *tiny(demo, tmp_path, "big", "data.batch_size=16", "train.max_steps=4"))
    acc = launch(
        "train",
        *tiny(
            demo,
            tmp_path,
            "acc",
            "data.batch_size=8",
            "train.accum_steps=2",
            "train.max_steps=4",
            "run.deterministic=true",
        ),
    )
    assert big.returncode == 0 and acc.returncode == 0, acc.stderr[-2000:]
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    again = launch(
        "train",
        *tiny(demo, tmp_path, "acc", "data.batch_size=8", "train.accum_steps=2", "train.max_steps=6"),
        "--resume",
        "auto",
    )
    assert again.returncode == 0 and "ckpt-00000004.pt at epoch 1, sample 64, step 4" in again.stderr


def test_training_without_a_validation_split(demo: Path, tmp_path: Path) -> None:
    res = launch("train", *tiny(demo, tmp_path, "noval", "data.val_fraction=0", "train.epochs=1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no validation set" in res.stderr
    summary = json.loads((tmp_path / "noval" / "summary.json").read_text())
    assert summary["val_acc"] is None and summary["train_acc"] is not None
