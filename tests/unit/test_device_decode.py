"""data.decode_on = 'cuda', run here with device = cpu: the batched decode path (workers hand
out file bytes, the main process decodes the batch, resizes and augments each item under
its own seed) must give exactly the batches of the ordinary CPU path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.folder import Samples
from datasets.loader import LoaderSpec, build_loader
from datasets.transforms import Decoder, eval_transform, train_transform
from distrib.config import load_config
from distrib.context import DistContext
from distrib.errors import LaunchError

pytestmark = pytest.mark.timeout(120)


def jpegs(folder: Path, n: int, ext: str = "jpg") -> Samples:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:48, 0:40]
    paths = []
    for i in range(n):
        rgb = np.stack([(x * (i + 3)) % 256, (y * 5 + i * 20) % 256, (x + y) % 256], -1).astype(np.uint8)
        p = folder / f"{i:02d}.{ext}"
        Image.fromarray(rgb).save(p)
        paths.append(str(p))
    return Samples(np.array(paths), np.arange(n, dtype=np.int64) % 2, ("a", "b"))


DATA = ["data.resize=[24, 20]", "data.crop=[16, 16]", "data.hflip=0.5", "data.vflip=0.5", "data.rotation=15"]


def loader(
    samples: Samples, on_device: bool, workers: int = 0, train: bool = True, batch: int = 5, **kw: object
):
    data = load_config(None, DATA).data
    spec = LoaderSpec(seed=3, batch_size=batch, num_workers=workers, train=train, decoder=Decoder((24, 20)),
                      decode_on_device=on_device, **kw)  # fmt: skip
    tf = train_transform(data) if train else eval_transform(data)
    return build_loader(samples, tf, DistContext(), spec)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_batched_decode_path_gives_the_cpu_paths_batches(tmp_path: Path, workers: int) -> None:
    samples = jpegs(tmp_path / "j", 10)
    dev, cpu = loader(samples, True, workers), loader(samples, False, workers)
    assert dev.device_decoder is not None and cpu.device_decoder is None
    for epoch in (0, 1):
        a, b = list(dev.epoch(epoch)), list(cpu.epoch(epoch))
        assert len(a) == len(b) == 2
        for x, y in zip(a, b, strict=True):
            assert (
                x.encoded is None and torch.equal(x.indices, y.indices) and torch.equal(x.targets, y.targets)
            )
            assert torch.equal(x.images, y.images)
    val = [b.images for b in loader(samples, True, workers, train=False).epoch(0)]
    assert torch.equal(
        torch.cat(val), torch.cat([b.images for b in loader(samples, False, workers, train=False).epoch(0)])
    )


def test_a_split_that_is_not_all_jpeg_decodes_on_the_cpu_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mixed = jpegs(tmp_path / "j", 3)
    png = jpegs(tmp_path / "p", 1, ext="png")
    both = Samples(np.concatenate([mixed.paths, png.paths]), np.array([0, 1, 0, 1]), ("a", "b"))
    with caplog.at_level(logging.INFO):
        ld = loader(both, True, batch=2)
    assert (
        ld.device_decoder is None and "holds png files, not only JPEGs; it decodes on the CPU" in caplog.text
    )
    assert sum(len(b) for b in ld.epoch(0)) == 4


def test_device_decoding_needs_a_resize(tmp_path: Path) -> None:
    samples = jpegs(tmp_path / "j", 2)
    spec = LoaderSpec(seed=0, batch_size=2, decode_on_device=True)
    with pytest.raises(LaunchError, match=r"set data.resize = \[H, W\] \(or data.decode_on = 'cpu'\)"):
        build_loader(samples, train_transform(load_config(None, []).data), DistContext(), spec)


def test_a_corrupt_jpeg_is_named_or_skipped(tmp_path: Path) -> None:
    samples = jpegs(tmp_path / "j", 6)
    Path(samples.paths[4]).write_bytes(Path(samples.paths[4]).read_bytes()[:200])  # truncated
    with pytest.raises(LaunchError, match=r"cannot decode .*04.jpg on cpu: .*on_bad_image = 'skip'"):
        list(loader(samples, True, train=False).epoch(0))
    batches = list(loader(samples, True, train=False, on_bad_image="skip").epoch(0))
    assert sum(len(b) for b in batches) == 5
    assert [s.path for b in batches for s in b.skipped] == [samples.paths[4]]
    assert 4 not in torch.cat([b.indices for b in batches]).tolist()


@pytest.mark.parametrize("train", [False, True])
def test_a_skipped_image_mid_batch_keeps_every_other_items_target(tmp_path: Path, train: bool) -> None:
    """Every item has its own label; the corrupt file sits inside a batch. The kept items' targets
    and pixels are the CPU path's (a shift by one after the gap would mislabel the rest)."""
    base = jpegs(tmp_path / "j", 8)
    samples = Samples(base.paths, np.arange(8, dtype=np.int64), tuple(f"c{i}" for i in range(8)))
    Path(samples.paths[1]).write_bytes(Path(samples.paths[1]).read_bytes()[:200])  # truncated
    dev = list(loader(samples, True, train=train, on_bad_image="skip").epoch(0))
    cpu = list(loader(samples, False, train=train, on_bad_image="skip").epoch(0))
    assert any(len(b.skipped) for b in dev) and all(len(b) for b in dev)
    for x, y in zip(dev, cpu, strict=True):
        assert torch.equal(x.targets, torch.as_tensor(samples.targets)[x.indices]), (x.indices, x.targets)
        assert torch.equal(x.indices, y.indices) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.images, y.images)
    assert 1 not in torch.cat([b.indices for b in dev]).tolist()
