"""Elastic resume on real processes (CPU, gloo): a run stopped on one world size continues on
another as the uninterrupted run would; a world size that cannot keep the global batch is
refused; a resume that replays a step fails the sample ledger."""

from __future__ import annotations

import csv
import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH, REPO, clean_env, launch, tiny, weights
from test_faults import start, stop_and_check

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
# 84 training images, global batch 8 (4 per rank on 2 ranks): 10 steps per epoch, 4 images left out
SETS = ("data.batch_size=4", "train.epochs=3", "checkpoint.keep_last=3")
TOL = {"rtol": 1e-5, "atol": 1e-6}  # only the summation order differs between world sizes


@pytest.fixture(scope="module")
def two_ranks(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run every resumed one is held against."""
    out = tmp_path_factory.mktemp("elastic")
    res = launch("train", "--nproc-per-node", "2", *tiny(demo, out, "ref", *SETS), timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "ref"


def same_training(ref: Path, run: Path) -> None:
    """Weights within TOL; metrics.csv's rows alike (figures to 1e-6); every epoch's ledger exact."""
    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **TOL) for k in a)
    rows = [list(csv.DictReader((d / "metrics.csv").open())) for d in (ref, run)]
    assert len(rows[0]) == len(rows[1]) == 6
    for x, y in zip(*rows, strict=True):
        assert (x["epoch"], x["split"], x["images"]) == (y["epoch"], y["split"], y["images"])
        for key in ("loss", "acc", "lr"):
            assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-6), (key, x, y)
    ledger = json.loads((run / "summary.json").read_text())["sample_ledger"]
    assert [(e["epoch"], e["samples"], e["left_out"], e["exact"]) for e in ledger] == [
        (0, 80, 4, True),
        (1, 80, 4, True),
        (2, 80, 4, True),
    ]


def test_two_ranks_stopped_mid_epoch_by_sigterm_resume_on_one_rank_as_if_never_stopped(
    demo: Path, two_ranks: Path, tmp_path: Path
) -> None:
    args = [sys.executable, LAUNCH, "train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "s", *SETS)]
    proc = start(args)
    stop_and_check(proc, signal.SIGTERM, tmp_path / "s", ranks=2, after=12)  # inside epoch 2
    assert proc.returncode == 143
    res = launch("train", *tiny(demo, tmp_path, "s", *SETS), "--resume", "auto", timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stderr.splitlines() if "world size 2 -> 1" in x)
    assert (
        "resuming at epoch 2, sample " in line and " of 80, global batch 8 kept (per-rank batch 4, " in line
    )
    assert "accumulation 2)" in line, line
    assert "per-rank model randomness (dropout) restarts" in res.stderr
    same_training(two_ranks, tmp_path / "s")


def test_one_rank_resumes_on_two_and_three_ranks_are_refused_before_training(
    demo: Path, two_ranks: Path, tmp_path: Path
) -> None:
    first = launch("train", *tiny(demo, tmp_path, "o", *SETS, "train.global_batch=8", "train.max_steps=13"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "global batch 8 (per-rank batch 4, accumulation 2, 1 rank(s))" in first.stderr
    run = tmp_path / "o"
    before = sorted(p.name for p in (run / "checkpoints").iterdir()), (run / "steps.csv").read_text()
    three = launch("train", "--nproc-per-node", "3", *tiny(demo, tmp_path, "o", *SETS), "--resume", "auto")
    assert three.returncode == 2 and "Traceback" not in three.stderr, three.stderr[-3000:]
    assert (
        "global batch 8 cannot be split over 3 ranks (8 is not a multiple of 3); world sizes that keep "
        in (three.stderr)
    )
    assert "it: 1, 2, 4, 8; resume on one of those world sizes" in three.stderr
    assert (
        sorted(p.name for p in (run / "checkpoints").iterdir()),
        (run / "steps.csv").read_text(),
    ) == before
    two = launch("train", "--nproc-per-node", "2", *tiny(demo, tmp_path, "o", *SETS), "--resume", "auto")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (
        "world size 1 -> 2: resuming at epoch 2, sample 24 of 80, global batch 8 kept (per-rank batch 4, "
        in (two.stderr)
    )
    same_training(two_ranks, run)


def test_a_resume_that_replays_a_step_fails_the_sample_ledger(demo: Path, tmp_path: Path) -> None:
    first = launch("train", *tiny(demo, tmp_path, "r", *SETS, "train.global_batch=8", "train.max_steps=13"))
    assert first.returncode == 0, first.stderr[-3000:]
    res = launch(
        "train",
        *tiny(demo, tmp_path, "r", *SETS),
        "--resume",
        "auto",
        env=clean_env(PYTHONPATH=str(REPO / "tests" / "fakes" / "replay")),
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (
        "sample ledger of epoch 2: 8 sample(s) trained more often and 0 less often than the epoch's order "
        "holds them (of 80 consumed" in res.stderr
    ), res.stderr[-3000:]
