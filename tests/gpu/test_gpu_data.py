"""The data path on CUDA: pinned uint8 batches, normalisation on the device (skipped without CUDA)."""

from __future__ import annotations

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
