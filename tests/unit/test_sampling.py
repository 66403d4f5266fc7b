"""Samplers and seeding, over simulated ranks in one process with real DataLoaders."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.folder import Samples
from datasets.loader import LoaderSpec, build_loader
from datasets.samplers import BalancedSampler, ExactEvalSampler, TrainSampler
from datasets.transforms import train_transform
from distrib.config import load_config
from distrib.context import DistContext
from distrib.seeding import WorkerSeeder, derive_seed, sample_seed, worker_seed


def ctx(rank: int, world: int) -> DistContext:
    return DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world)


def test_derived_seeds_are_pure_and_distinct() -> None:
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {worker_seed(0, r, w, e) for r in range(4) for w in range(4) for e in range(4)}
    assert len(seeds) == 64
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) != sample_seed(1, 1, 2)


def test_no_two_rank_worker_pairs_draw_the_same_stream() -> None:
    draws = {}
    for rank in range(2):
        for worker in range(3):
            WorkerSeeder(seed=5, rank=rank, epoch=1)(worker)
            draws[(rank, worker)] = (torch.rand(4).tolist(), np.random.rand(), __import__("random").random())
    values = list(draws.values())
    assert all(values[i] != values[j] for i in range(len(values)) for j in range(i))
    WorkerSeeder(seed=5, rank=1, epoch=1)(2)
    assert torch.rand(4).tolist() == draws[(1, 2)][0]  # reproducible


def _steps(world: int, batch: int, n: int, epoch: int) -> list[list[list[int]]]:
    """Per rank, the list of index batches of one epoch (global batch 8)."""
    out = []
    for r in range(world):
        s = TrainSampler(n, ctx(r, world), seed=3, global_batch=8)
        s.set_epoch(epoch)
        keys = list(s)
        assert all(e == epoch for _, e in keys)
        idx = [i for i, _ in keys]
        out.append([idx[k : k + batch] for k in range(0, len(idx), batch)])
    return out


def test_two_rank_steps_union_to_the_one_rank_double_batch() -> None:
    n, b = 103, 4
    (one,) = _steps(1, 2 * b, n, epoch=0)
    r0, r1 = _steps(2, b, n, epoch=0)
    assert len(one) == len(r0) == len(r1) == n // 8  # every batch full: the tail of n % 8 is left out
    for k in range(len(one)):
        assert sorted(r0[k] + r1[k]) == sorted(one[k])
    flat0, flat1 = sum(r0, []), sum(r1, [])
    assert not set(flat0) & set(flat1) and len(flat0) == len(flat1) == n // 8 * 4
    assert _steps(2, b, n, epoch=1)[0] != r0  # epochs differ


def test_same_epoch_twice_warns() -> None:
    s = TrainSampler(10, ctx(0, 1), seed=0)
    s.set_epoch(0)
    list(s)
    with pytest.warns(UserWarning, match="iterated twice for epoch 0"):
        list(s)
    s.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(s)


def test_exact_eval_shards_cover_every_sample_once() -> None:
    n = 101
    seen = [i for r in range(3) for i, _ in ExactEvalSampler(n, ctx(r, 3))]
    assert sorted(seen) == list(range(n))
    assert [len(ExactEvalSampler(n, ctx(r, 2))) for r in range(2)] == [51, 50]


def test_balanced_sampler_is_near_uniform_over_classes_and_shared_by_ranks() -> None:
    targets = np.repeat(np.arange(3), [900, 90, 10])
    draws = []
    for r in range(2):
        s = BalancedSampler(targets, ctx(r, 2), seed=1)
        s.set_epoch(4)
        draws.append([i for i, _ in s])
    assert len(draws[0]) == len(draws[1]) == 500
    union = np.array(draws[0] + draws[1])
    freq = np.bincount(targets[union], minlength=3) / len(union)
    noise = 4 * np.sqrt((1 / 3) * (2 / 3) / len(union))  # 4 sigma of a binomial share
    assert np.all(np.abs(freq - 1 / 3) < noise), freq
    # one global draw: the ranks' shares interleave into it exactly
    g = BalancedSampler(targets, ctx(0, 1), seed=1)
    g.set_epoch(4)
    whole = [i for i, _ in g]
    assert whole[0::2] == draws[0] and whole[1::2] == draws[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        p = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return Samples(np.array(paths), np.arange(12, dtype=np.int64) % 3, ("a", "b", "c"))


def _augmented(images: Samples, world: int, workers: int, epoch: int) -> dict[int, torch.Tensor]:
    cfg = load_config(
        None,
        [
            "data.crop=[12, 12]",
            "data.crop_scale=[0.2, 1.0]",
            "data.hflip=0.5",
            "data.vflip=0.5",
            "data.rotation=30",
        ],
    )
    out = {}
    for r in range(world):
        loader = build_loader(
            images,
            train_transform(cfg.data),
            ctx(r, world),
            LoaderSpec(seed=9, batch_size=4, num_workers=workers, train=True),
        )
        for batch in loader.epoch(epoch):
            out.update(zip(batch.indices.tolist(), batch.images, strict=True))
    return out


def test_augmentation_depends_only_on_seed_epoch_and_index(images: Samples) -> None:
    ref = _augmented(images, world=1, workers=0, epoch=2)
    assert len(ref) == 12
    for world, workers in [(1, 1), (1, 2), (2, 0), (2, 2)]:
        got = _augmented(images, world, workers, epoch=2)
        assert got.keys() <= ref.keys() and len(got) == 12 // (4 * world) * (4 * world)  # the tail rule
        for i, img in got.items():
            assert torch.equal(img, ref[i]), (world, workers, i)
    other = _augmented(images, world=1, workers=0, epoch=3)
    assert any(not torch.equal(other[i], ref[i]) for i in ref)


def test_augmentation_does_not_touch_the_callers_rng(images: Samples) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _augmented(images, world=1, workers=0, epoch=0)
    assert torch.equal(torch.rand(3), expected)


def test_loader_has_no_plain_iteration(images: Samples) -> None:
    cfg = load_config(None)
    loader = build_loader(
        images,
        train_transform(cfg.data),
        ctx(0, 1),
        LoaderSpec(seed=0, batch_size=4, num_workers=0, train=True),
    )
    assert not hasattr(loader, "__iter__")
    assert len(list(loader.epoch(0))) == 3


def test_bad_image_error_names_the_file_or_is_skipped(images: Samples, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    samples = Samples(np.array([images.paths[0], str(bad)]), np.array([0, 1]), ("a", "b"))
    cfg = load_config(None)
    from distrib.errors import LaunchError

    def loader(workers: int, on_bad_image: str = "error"):
        return build_loader(
            samples,
            train_transform(cfg.data),
            ctx(0, 1),
            LoaderSpec(seed=0, batch_size=2, num_workers=workers, train=True, on_bad_image=on_bad_image),
        )

    for workers in (0, 2):
        with pytest.raises(LaunchError) as e:
            list(loader(workers).epoch(0))
        assert str(bad) in str(e.value) and "on_bad_image" in str(e.value)
        assert "Traceback" not in str(e.value)
    (batch,) = list(loader(2, "skip").epoch(0))
    assert len(batch) == 1 and [s.path for s in batch.skipped] == [str(bad)]


# ----------------------------------------------------------------------------- through the config


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """4 classes of 8 px images: 48, 8, 8, 8 (a flat folder + CSV), as --set items."""
    import csv

    from datasets.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("imb")
    csv_path = write_synthetic(root, classes=4, per_class=48, size=8)
    rows = list(csv.reader(csv_path.open()))
    seen: dict[str, int] = {}
    keep = [rows[0]]
    for name, label in rows[1:]:
        seen[label] = seen.get(label, 0) + 1
        if label == "disc" or seen[label] <= 8:
            keep.append([name, label])
    with (root / "imb.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(keep)
    return [
        f"data.csv={root / 'imb.csv'}",
        f"data.images={root / 'images'}",
        f"data.cache_dir={root / 'c'}",
        "data.val_fraction=0",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.25,0.25,0.25]",
        "model.width=4",
    ]


def engine_loader(sets: list[str]):
    """The training loader exactly as `launch.py train` builds it from the config."""
    from datasets.build import build_split
    from distrib.engine.train import build_feed

    cfg = load_config(None, sets)
    context = DistContext()
    split = build_split(context, cfg)
    return build_feed(context, cfg, split).train, split


def test_balanced_sampler_set_in_the_config_balances_the_batches(imbalanced: list[str]) -> None:
    loader, split = engine_loader([*imbalanced, "data.sampler=balanced"])
    counts = np.zeros(4)
    for epoch in range(4):
        for batch in loader.epoch(epoch):
            counts += np.bincount(batch.targets.numpy(), minlength=4)
    share = counts / counts.sum()
    sizes = np.bincount(split.train.targets)
    assert sorted(sizes.tolist()) == [8, 8, 8, 48]  # the data really is imbalanced
    assert np.all(np.abs(share - 0.25) < 0.08), share  # the plain sampler would give 0.67 to class 0
    plain, _ = engine_loader(imbalanced)
    counts = sum(np.bincount(b.targets.numpy(), minlength=4) for b in plain.epoch(0))
    assert counts[sizes.argmax()] / counts.sum() > 0.6


def test_the_training_order_changes_from_epoch_to_epoch(imbalanced: list[str]) -> None:
    loader, split = engine_loader(imbalanced)
    orders = [[i for b in loader.epoch(e) for i in b.indices.tolist()] for e in range(3)]
    assert all(sorted(o) == list(range(len(split.train))) for o in orders)  # each epoch: every image once
    assert orders[0] != orders[1] != orders[2] and orders[0] != orders[2]
    again, _ = engine_loader(imbalanced)
    assert [i for b in again.epoch(1) for i in b.indices.tolist()] == orders[1]  # and it is seeded
