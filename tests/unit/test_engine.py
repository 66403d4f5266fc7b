"""Engine pieces that need no processes: schedule, checkpoints, modes, models, messages."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from distrib.config import ModelSection, load_config
from distrib.context import DistContext
from distrib.engine import checkpoint as ck
from distrib.engine.models import SmallCNN, build_model
from distrib.engine.parallel import resolve_mode, unwrap, wrap
from distrib.engine.step import check_batch_fits, lr_factor, oom_message
from distrib.errors import CheckpointWriteError, LaunchError


def test_lr_schedules() -> None:
    assert [lr_factor(s, 100, 4, "cosine", 10, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine", 10, 0.1) == 1.0
    assert lr_factor(100, 100, 4, "cosine", 10, 0.1) == pytest.approx(0.0)
    assert lr_factor(52, 100, 4, "cosine", 10, 0.1) == pytest.approx(0.5)
    assert lr_factor(13, 100, 0, "step", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 100, 0, "constant", 10, 0.1) == 1.0


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ck.rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ck.save_atomic({"rng": state}, tmp_path / "x.pt")
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)["rng"]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ck.set_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def _fake_ckpt(step: int) -> dict:
    return {
        "format": 1,
        "model": {"w": torch.full((2,), float(step))},
        "model_name": "small_cnn",
        "classes": ["a", "b"],
    }


def test_manager_keeps_the_last_k_and_best(tmp_path: Path) -> None:
    mgr = ck.CheckpointManager(tmp_path / "c", keep_last=2)
    mgr.check_writable()
    for step in (3, 6, 9, 12):
        mgr.save(_fake_ckpt(step), step, best=step == 6)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["best.pt", "ckpt-00000009.pt", "ckpt-00000012.pt"]
    assert ck.latest(tmp_path / "c").name == "ckpt-00000012.pt"
    assert ck.load_checkpoint(tmp_path / "c" / "best.pt")["model"]["w"][0] == 6
    assert ck.latest(tmp_path / "absent") is None


def test_atomic_save_leaves_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt-00000001.pt"
    ck.save_atomic(_fake_ckpt(1), path)

    def broken(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint {path}: disk full"):
        ck.save_atomic(_fake_ckpt(2), path)
    assert ck.load_checkpoint(path)["model"]["w"][0] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_corrupt_foreign_and_missing_checkpoints(tmp_path: Path) -> None:
    ck.save_atomic(_fake_ckpt(1), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(LaunchError, match="corrupt or truncated"):
        ck.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(LaunchError, match="not a launch.py checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(LaunchError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "none.pt")


def test_compatibility_names_both_sides() -> None:
    c = _fake_ckpt(1)
    with pytest.raises(LaunchError, match="holds model 'small_cnn', this run builds 'resnet18'"):
        ck.check_compatible(c, ModelSection(name="resnet18"), ("a", "b"), Path("x.pt"))
    with pytest.raises(LaunchError, match="trained on 2 classes"):
        ck.check_compatible(c, ModelSection(), ("a", "b", "c"), Path("x.pt"))
    ck.check_compatible(c, ModelSection(), ("a", "b"), Path("x.pt"))


def test_parallel_modes() -> None:
    one, two = DistContext(), DistContext(rank=0, world_size=2, local_world_size=2)
    assert resolve_mode("auto", one) == "none" and resolve_mode("auto", two) == "ddp"
    assert resolve_mode("ddp", one) == "none"
    with pytest.raises(LaunchError, match="DataParallel"):
        resolve_mode("dp", two)
    model = SmallCNN(3, 4)
    dp = wrap(model, one, "dp")
    assert isinstance(dp, torch.nn.DataParallel) and unwrap(dp) is model
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(dp(x), model(x))  # on CPU a plain call
    with pytest.raises(LaunchError, match="sync_bn needs CUDA"):
        wrap(model, two, "ddp", sync_bn=True)


def test_models_by_name_and_local_weights(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=resnet18"]).model
    net = build_model(cfg, 7)
    assert net.fc.out_features == 7
    with pytest.raises(LaunchError, match="did you mean resnet18"):
        build_model(load_config(None, ["model.name=resnet19"]).model, 3)
    src = SmallCNN(10, 8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    got = build_model(load_config(None, ["model.width=8", f"model.weights={tmp_path / 'w.pt'}"]).model, 3)
    assert torch.equal(got.features[0].weight, src.features[0].weight)  # body loaded
    assert got.head.out_features == 3  # another head stays fresh
    with pytest.raises(LaunchError, match="never downloaded"):
        build_model(load_config(None, [f"model.weights={tmp_path / 'none.pt'}"]).model, 3)


def test_grad_clip_bounds_the_update() -> None:
    from types import SimpleNamespace
    from unittest.mock import Mock

    from distrib.engine.step import make_optimizer, optimizer_step

    model = torch.nn.Linear(4, 1, bias=False)
    model.weight.grad = torch.full((1, 4), 100.0)
    cfg = load_config(None, ["optim.momentum=0", "optim.weight_decay=0", "optim.lr=1", "train.grad_clip=1"])
    eng = SimpleNamespace(model=model, scaler=None, optimizer=make_optimizer(cfg, model), scheduler=Mock())
    before = model.weight.detach().clone()
    optimizer_step(DistContext(), cfg, eng, (0, 0), torch.zeros((), dtype=torch.float64))
    assert torch.linalg.norm(model.weight - before).item() == pytest.approx(1.0, rel=1e-5)


def test_messages_for_oom_and_batch_size() -> None:
    cfg = load_config(None, ["data.batch_size=64"])
    msg = oom_message(DistContext(), cfg, (64, 3, 1024, 1024))
    assert "data.batch_size 64" in msg and "bf16" in msg and "[64, 3, 1024, 1024]" in msg
    with pytest.raises(LaunchError, match=r"global batch of 128 images \(data.batch_size 64 x 2 rank\(s\) x "
                       r"train.accum_steps 1\) is larger than the 80 training images"):  # fmt: skip
        check_batch_fits(DistContext(rank=0, world_size=2, local_world_size=2), cfg, 80)
    check_batch_fits(DistContext(rank=0, world_size=2, local_world_size=2), cfg, 128)  # one step fits
    asked = load_config(None, ["data.batch_size=64", "train.global_batch=256", "train.accum_steps=4"])
    with pytest.raises(
        LaunchError, match=r"global batch of 256 images \(train.global_batch = 256\) is larger"
    ):
        check_batch_fits(DistContext(), asked, 80)


def test_paired_ratio_recovers_a_known_overhead_through_noise() -> None:
    """3% slower in every pair, both sides multiplied by the same drifting load, plus a few outliers."""
    import random

    from distrib.bench.toolkit import paired_ratio

    rng = random.Random(1)
    load = [1 + 0.5 * rng.random() for _ in range(300)]  # the machine's load drifts +-50%
    base = [0.07 * x * (1 + rng.gauss(0, 0.01)) for x in load]
    ours = [0.07 * 1.03 * x * (1 + rng.gauss(0, 0.01)) for x in load]
    ours[::50] = [10 * v for v in ours[::50]]  # a neighbour disturbed a few steps
    r = paired_ratio(ours, base)
    assert r.low < 1.03 < r.high and abs(r.ratio - 1.03) < 0.005 and r.high - r.low < 0.01
    assert r.as_percent().startswith("+3.") and "95% CI" in r.as_percent() and "300 pairs" in r.as_percent()
    with pytest.raises(ValueError):
        paired_ratio([1.0], [])


def test_bench_parallels_loss_check_fails_a_mode_that_trains_something_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same first global losses pass; a ddp run whose losses drift by 1e-3 is marked NO."""
    from distrib.bench.parallel import Spec, check_losses, summarise_mode, table

    def ranks(world: int, losses: list[float]) -> list[dict]:
        per = 8 // world  # one global batch of 8, split over the ranks: loss sums and counts per rank
        return [{"seconds": [0.1, 0.1, 0.1], "data_wait": 0.0, "memory": {"rss": 2**20},
                 "losses": [[loss * per, per] for loss in losses]} for _ in range(world)]  # fmt: skip

    truth = [2.30, 2.21, 2.05]
    single = summarise_mode(Spec("single", 1, 1, "small_cnn", 8, 32, 3, 0, "off"), ranks(1, truth), None)
    same = summarise_mode(Spec("ddp", 2, 2, "small_cnn", 8, 32, 3, 0, "off"), ranks(2, truth), single)
    drift = summarise_mode(Spec("ddp", 2, 2, "small_cnn", 8, 32, 3, 0, "off"),
                           ranks(2, [truth[0], truth[1] * 1.001, truth[2]]), single)  # fmt: skip
    rows = [single, same, drift]
    with caplog.at_level("WARNING"):
        check_losses(rows, "off")
    assert [r["loss_ok"] for r in rows] == [True, True, False]
    assert "ddp's losses differ from single's by 0.001" in caplog.text
    assert table(rows, {}).count("| NO |") == 1
    check_losses(rows, "bf16")  # 1e-3 is within bf16's 2e-2
    assert all(r["loss_ok"] for r in rows)


def test_planned_epochs_follow_max_steps() -> None:
    from distrib.engine.metrics import planned_epochs

    memcheck = load_config(None, ["train.epochs=1000000", "train.max_steps=300"])
    assert planned_epochs(memcheck, 7) == 43  # 300 steps of 7 batches: 43 epochs, not a million
    assert planned_epochs(load_config(None, ["train.epochs=5"]), 7) == 5
    accum = load_config(None, ["train.epochs=50", "train.max_steps=10", "train.accum_steps=2"])
    assert planned_epochs(accum, 4) == 3  # 4 steps per epoch
