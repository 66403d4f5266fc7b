"""The data path on CUDA: pinned uint8 batches, normalisation on the device (skipped without CUDA)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_pinned_uint8_batches_normalised_on_the_gpu(tmp_path: Path) -> None:
    from datasets.folder import scan_imagefolder
    from datasets.loader import LoaderSpec, build_loader
    from datasets.transforms import Normalizer, eval_transform
    from distrib.config import load_config
    from distrib.context import DistContext

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / f"c{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = load_config(None)
    ctx = DistContext(device="cuda:0", backend="nccl")
    loader = build_loader(
        scan_imagefolder(tmp_path),
        eval_transform(cfg.data),
        ctx,
        LoaderSpec(seed=0, batch_size=4, num_workers=2, train=False),
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    gpu, cpu = Normalizer(mean, std, "cuda:0"), Normalizer(mean, std, "cpu")
    for batch in loader.epoch(0):
        assert batch.images.dtype == torch.uint8 and batch.images.is_pinned()
        on_gpu = gpu(batch.to("cuda:0").images)
        assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), cpu(batch.images), atol=1e-5)


def test_jpeg_batches_decoded_on_the_gpu_match_the_cpu_path(tmp_path: Path) -> None:
    """data.decode_on = 'cuda': nvJPEG batches, resized and augmented on the GPU, with the CPU
    path's crops and flips (same per-item seeds) and pixels within nvJPEG's rounding."""
    from datasets.folder import scan_imagefolder
    from datasets.loader import LoaderSpec, build_loader
    from datasets.transforms import Decoder, train_transform
    from distrib.config import load_config
    from distrib.context import DistContext

    y, x = np.mgrid[0:256, 0:192]
    for i in range(12):
        folder = tmp_path / f"c{i % 2}"
        folder.mkdir(exist_ok=True)
        rgb = np.stack([(x * (i + 1)) % 256, (y + 9 * i) % 256, (x + y) % 256], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.jpg", quality=90)
    samples = scan_imagefolder(tmp_path)
    data = load_config(None, ["data.resize=[128, 96]", "data.crop=[64, 64]", "data.hflip=0.5"]).data
    spec = LoaderSpec(seed=1, batch_size=4, num_workers=2, train=True, decoder=Decoder((128, 96)))
    gpu = build_loader(samples, train_transform(data), DistContext(device="cuda:0", backend="nccl"),
                       dataclasses.replace(spec, decode_on_device=True))  # fmt: skip
    cpu = build_loader(samples, train_transform(data), DistContext(), spec)
    assert gpu.device_decoder is not None
    for a, b in zip(gpu.epoch(1), cpu.epoch(1), strict=True):
        assert a.images.is_cuda and a.images.dtype == torch.uint8 and a.images.shape == b.images.shape
        assert torch.equal(a.indices, b.indices)
        mse = ((a.images.cpu().double() - b.images.double()) ** 2).mean().item()
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 30, f"PSNR {10 * np.log10(255**2 / mse):.1f} dB"


def test_a_warm_cache_read_in_process_gives_pinned_batches_equal_to_the_cold_epoch(tmp_path: Path) -> None:
    """data.cache_read = 'inline' on a GPU host: no DataLoader workers once the cache is warm, and
    the batches are still pinned (for the asynchronous copy) and the workers' batches bit for bit."""
    import multiprocessing

    from datasets.cache import CachedSource, open_cache
    from datasets.folder import scan_imagefolder
    from datasets.loader import LoaderSpec, build_loader
    from datasets.transforms import Decoder, train_transform
    from distrib.config import load_config
    from distrib.context import DistContext

    rng = np.random.default_rng(2)
    for i in range(12):
        folder = tmp_path / "img" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    samples = scan_imagefolder(tmp_path / "img")
    data = load_config(None, ["data.resize=[32, 32]", "data.hflip=0.5"]).data
    ctx = DistContext(device="cuda:0", backend="nccl")
    cache = open_cache(ctx, [samples], tmp_path / "c", Decoder((32, 32)))
    spec = LoaderSpec(seed=3, batch_size=4, num_workers=2, train=True, decoder=Decoder((32, 32)))
    source = CachedSource(cache, cache.slots(samples))
    cold = build_loader(samples, train_transform(data), ctx, spec)  # no cache: workers decode
    warm = build_loader(samples, train_transform(data), ctx, spec, source)
    list(warm.epoch(0))  # fills the cache
    assert warm.warm is not None and warm.warm()
    expected = [b.images for b in cold.epoch(1)]
    for a, b in zip(warm.epoch(1), expected, strict=True):
        assert not multiprocessing.active_children()
        assert a.images.is_pinned() and torch.equal(a.images, b)
