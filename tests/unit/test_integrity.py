"""No silent wrong results: checkpoint digests, strict weights, run-directory ownership, log ranks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flip_inside_largest_tensor

from distrib.config import ModelSection, load_config
from distrib.engine import checkpoint as ck
from distrib.engine.models import SmallCNN, head_keys, load_weights
from distrib.errors import LaunchError
from distrib.logs import check_log_ranks
from distrib.worker import claim_run_dir


def _state(step: int = 1, width: int = 8) -> dict:
    model = SmallCNN(4, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "model_name": "small_cnn",
        "classes": ["a", "b", "c", "d"],
        "progress": {"global_step": step},
        "config": json.dumps({"model": {"name": "small_cnn", "width": width, "batchnorm": True}}),
    }


def _saved(folder: Path, step: int = 1) -> Path:
    ck.CheckpointManager(folder, keep_last=10).save(_state(step), step, best=False)
    return folder / f"ckpt-{step:08d}.pt"


def test_digest_catches_bytes_flipped_inside_a_tensor(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    assert ck.load_checkpoint(path)["format"] == ck.CKPT_FORMAT
    flip_inside_largest_tensor(path)
    torch.load(path, weights_only=True)  # torch alone loads the damaged file without a word
    with pytest.raises(LaunchError, match="fails its integrity check") as e:
        ck.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_digest_covers_every_value() -> None:
    a = _state()
    base = ck.payload_digest(a)
    b = {**a, "progress": {"global_step": 2}}
    assert ck.payload_digest(b) != base
    c = {**a, "model": {**a["model"], "head.bias": a["model"]["head.bias"].clone()}}
    assert ck.payload_digest(c) == base  # same values, new objects
    c["model"]["head.bias"][0] += 1e-7
    assert ck.payload_digest(c) != base
    d = {**a, "model": {**a["model"], "head.bias": a["model"]["head.bias"].double()}}
    assert ck.payload_digest(d) != base  # same numbers, another dtype


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is corrupt or truncated"),
        (lambda p: p.write_bytes(b"not a checkpoint at all\n"), "not a torch file"),
        (lambda p: torch.save({"model": _Evil(), "format": 2}, p), "holds pickled Python objects"),
    ],
    ids=["empty", "truncated", "text", "code"],
)
def test_each_damage_is_one_clear_line(damage, needle: str, tmp_path: Path) -> None:
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(LaunchError) as e:
        ck.load_checkpoint(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "will likely succeed" not in msg


class _Evil:
    def __reduce__(self):  # what a malicious "checkpoint" carries
        return (os.system, ("echo pwned",))


def test_resume_auto_skips_a_damaged_newest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2, 3):
        _saved(tmp_path, step)
    flip_inside_largest_tensor(tmp_path / "ckpt-00000003.pt")
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"")
    assert ck.newest_valid(tmp_path) == tmp_path / "ckpt-00000001.pt"
    assert "skipping ckpt-00000003.pt" in caplog.text and "skipping ckpt-00000002.pt" in caplog.text
    (tmp_path / "ckpt-00000001.pt").unlink()
    assert ck.newest_valid(tmp_path) is None


def test_formats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = _state()
    old["format"] = 1  # written before digests
    torch.save(old, tmp_path / "v1.pt")
    assert ck.load_checkpoint(tmp_path / "v1.pt")["format"] == 1
    assert "carries no digest" in caplog.text
    future = ck.with_digest(_state())
    future["format"] = 99
    torch.save(future, tmp_path / "v99.pt")
    with pytest.raises(LaunchError, match="format 99; this launch.py reads formats up to 2"):
        ck.load_checkpoint(tmp_path / "v99.pt")


def test_architecture_differences_name_the_keys() -> None:
    state = _state(width=8)
    assert ck.architecture_differences(state, ModelSection(width=8)) == []
    with pytest.raises(LaunchError, match="model.width = 8 in the checkpoint, 16 now"):
        ck.check_compatible(state, ModelSection(width=16), ("a", "b", "c", "d"), Path("x.pt"))
    model = SmallCNN(4, width=16)
    with pytest.raises(LaunchError, match=r"features.0.weight \[8, 3, 3, 3\] vs \[16, 3, 3, 3\]"):
        ck.load_model_state(model, state["model"], Path("x.pt"))


# ----------------------------------------------------------------------------- model.weights


def test_weights_of_another_width_are_an_error_listing_the_tensors(tmp_path: Path) -> None:
    torch.save(SmallCNN(4, width=8).state_dict(), tmp_path / "w.pt")
    with pytest.raises(LaunchError) as e:
        load_weights(SmallCNN(4, width=16), tmp_path / "w.pt", 4)
    msg = str(e.value)
    assert (
        "does not fit 16 tensor(s)" in msg
        and "features.0.weight [8, 3, 3, 3] in the file, [16, 3, 3, 3]" in msg
    )
    assert "model.weights_strict = false" in msg


def test_a_head_for_another_class_count_stays_fresh_with_both_shapes_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = SmallCNN(10, width=8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    caplog.set_level(logging.INFO)
    model = SmallCNN(4, width=8)
    fresh_head = model.head.weight.detach().clone()
    load_weights(model, tmp_path / "w.pt", 4)
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert torch.equal(model.head.weight, fresh_head)
    assert "head.weight is [10, 32] in w.pt, [4, 32] here" in caplog.text
    assert "loaded 15 of 17 learned tensor(s)" in caplog.text
    assert head_keys(model, 4) == {"head.weight", "head.bias"}


def test_partial_loading_on_purpose_says_how_much(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = SmallCNN(4, width=8).state_dict()
    del state["features.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(
        LaunchError, match="features.0.weight missing from the file; extra.weight not in the model"
    ):
        load_weights(SmallCNN(4, width=8), tmp_path / "w.pt", 4)
    caplog.set_level(logging.INFO)
    load_weights(SmallCNN(4, width=8), tmp_path / "w.pt", 4, strict=False)
    assert "loaded 16 of 17 learned tensor(s)" in caplog.text and "2 left fresh or ignored" in caplog.text
    torch.save(SmallCNN(5, width=32).state_dict(), tmp_path / "none.pt")
    with pytest.raises(LaunchError, match="no learned tensor fits"):
        load_weights(SmallCNN(4, width=8), tmp_path / "none.pt", 4, strict=False)


def test_weights_from_a_damaged_checkpoint_are_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    flip_inside_largest_tensor(path)
    with pytest.raises(LaunchError, match="fails its integrity check"):
        load_weights(SmallCNN(4, width=8), path, 4)


# ----------------------------------------------------------------------------- run directory, log ranks


def test_a_run_directory_belongs_to_one_run(tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-00000004.pt").write_bytes(b"x")
    (run / "metrics.csv").write_text("epoch\n")
    refusal = claim_run_dir(load_config(None), run)
    assert refusal and "--resume auto" in refusal and "run.name" in refusal and "run.overwrite" in refusal
    assert (run / "metrics.csv").exists()  # a refusal changes nothing
    assert claim_run_dir(load_config(None, ["checkpoint.resume=auto"]), run) is None
    assert claim_run_dir(load_config(None, ["run.overwrite=true"]), run) is None
    assert not run.exists()  # the old run's files are gone
    assert claim_run_dir(load_config(None), tmp_path / "new") is None
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch\n")
    refusal = claim_run_dir(load_config(None, ["run.overwrite=true"]), run, "preview")
    assert refusal and "holds a training run" in refusal and "another run.name" in refusal
    assert (run / "metrics.csv").exists()  # overwrite is for a new training run only


def test_overwrite_also_clears_a_separate_checkpoint_folder(tmp_path: Path) -> None:
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    (ckdir / "best.pt").write_bytes(b"x")
    (ckdir / "notes.txt").write_text("mine")
    cfg = load_config(None, [f"checkpoint.dir={ckdir}"])
    assert "1 checkpoint(s) in" in (claim_run_dir(cfg, tmp_path / "r") or "")
    cfg = load_config(None, [f"checkpoint.dir={ckdir}", "run.overwrite=true"])
    assert claim_run_dir(cfg, tmp_path / "r") is None
    assert sorted(p.name for p in ckdir.iterdir()) == ["notes.txt"]


def test_log_ranks_must_exist() -> None:
    check_log_ranks("0,1", 2)
    check_log_ranks("all", 1)
    with pytest.raises(LaunchError, match="rank 5 does not exist in this job of 2 rank"):
        check_log_ranks("5", 2)


def test_a_file_size_limit_mid_save_is_one_line_and_the_earlier_checkpoint_survives(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (ulimit -f) in a child process: torch's zip writer alone says only
    "unexpected pos"; the error names the path, the cause, the sizes, and the survivors."""
    first = _saved(tmp_path, 1)
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from distrib.engine import checkpoint as ck\n"
        "from distrib.errors import CheckpointWriteError\n"
        f"size = {first.stat().st_size}\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))\n"
        "state = {'model': {'w': torch.randn(size // 2)}, 'progress': {'global_step': 2}}\n"
        "try:\n"
        f"    ck.CheckpointManager(Path({str(tmp_path)!r}), keep_last=1).save(state, 2, best=False)\n"
        "except CheckpointWriteError as e:\n"
        "    print(e)\n"
        "    sys.exit(7)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 7, res.stderr[-2000:]
    message = res.stdout.strip()
    assert "\n" not in message and f"could not write checkpoint {tmp_path / 'ckpt-00000002.pt'}" in message
    assert "File too large (a file-size limit: ulimit -f)" in message and "needs about" in message
    assert "free in" in message and "ckpt-00000001.pt" in message and "--resume auto" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"]  # no partial file
    assert ck.load_checkpoint(first)["progress"]["global_step"] == 1  # and keep_last deleted nothing


def test_a_permission_lost_mid_run_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(root ignores file modes here, so the refusal is simulated where the file is opened)"""
    first = _saved(tmp_path, 1)
    real_open = Path.open

    def refuse(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ck.CheckpointWriteError, match="Permission denied; it needs about") as err:
        ck.CheckpointManager(tmp_path, keep_last=1).save(_state(2), 2, best=False)
    assert "ckpt-00000001.pt" in str(err.value)
    monkeypatch.undo()
    assert ck.load_checkpoint(first)["progress"]["global_step"] == 1
