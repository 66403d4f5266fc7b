"""Decoding to 3 x uint8, normalisation on the device, and uint8 collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.collate import Skipped, collate_uint8
from datasets.transforms import BadImageError, Normalizer, decode_uint8, eval_transform, train_transform
from distrib.config import load_config
from distrib.errors import LaunchError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff", "webp", "ppm"])
def test_lossless_formats_decode_to_the_same_pixels(ext: str, tmp_path: Path) -> None:
    path = tmp_path / f"x.{ext}"
    Image.fromarray(RGB).save(path, **({"lossless": True} if ext == "webp" else {}))
    img = decode_uint8(path)
    assert img.dtype == torch.uint8 and img.shape == (3, 12, 10)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), RGB)


def test_jpeg_gray_rgba_palette_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "x.jpg", quality=95)
    assert decode_uint8(tmp_path / "x.jpg").shape == (3, 12, 10)
    Image.fromarray(RGB[..., 0]).save(tmp_path / "g.png")
    g = decode_uint8(tmp_path / "g.png")
    assert torch.equal(g[0], g[2]) and np.array_equal(g[0].numpy(), RGB[..., 0])
    Image.fromarray(np.dstack([RGB, RGB[..., :1]])).save(tmp_path / "a.png")
    assert np.array_equal(decode_uint8(tmp_path / "a.png").permute(1, 2, 0).numpy(), RGB)
    Image.fromarray(RGB).convert("P").save(tmp_path / "p.png")
    assert decode_uint8(tmp_path / "p.png").shape == (3, 12, 10)
    sixteen = RGB[..., 0].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    s = decode_uint8(tmp_path / "s.png")
    assert s.dtype == torch.uint8 and np.array_equal(s[1].numpy(), RGB[..., 0])
    Image.fromarray(sixteen).save(tmp_path / "s.tif")
    assert np.array_equal(decode_uint8(tmp_path / "s.tif")[0].numpy(), RGB[..., 0])


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp"])
def test_truncated_and_corrupt_files_name_the_file(ext: str, tmp_path: Path) -> None:
    path = tmp_path / f"x.{ext}"
    Image.fromarray(RGB).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=str(path)):
        decode_uint8(path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="cannot decode"):
        decode_uint8(path)


def test_normalizer_matches_the_float_recipe_and_round_trips() -> None:
    x = torch.from_numpy(RGB).permute(2, 0, 1)[None].contiguous()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    norm = Normalizer(mean, std, "cpu", channels_last=True)
    got = norm(x)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(got, ref, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm.denormalize(got), x)


def test_normalizer_reuse_writes_into_one_buffer() -> None:
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu", reuse=True)
    a = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    out_a = norm(a)
    expected_b = Normalizer((0.5,) * 3, (0.25,) * 3, "cpu")(b)
    out_b = norm(b)
    assert out_b.data_ptr() == out_a.data_ptr() and torch.allclose(out_b, expected_b)
    assert norm(a[:1]).shape == (1, 3, 4, 4)  # another shape gets its own buffer


def test_transforms_from_config_keep_uint8() -> None:
    cfg = load_config(
        None, ["data.resize=[20, 16]", "data.crop=[8, 8]", "data.rotation=10", "data.vflip=0.5"]
    )
    x = torch.from_numpy(RGB).permute(2, 0, 1).contiguous()
    assert train_transform(cfg.data)(x).shape == (3, 8, 8)
    out = eval_transform(cfg.data)(x)
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8


def _item(h: int, w: int, idx: int) -> tuple[torch.Tensor, int, int]:
    return torch.full((3, h, w), idx, dtype=torch.uint8), idx % 2, idx


def test_collate_stacks_uint8_and_carries_skipped_files() -> None:
    b = collate_uint8([_item(4, 5, 0), Skipped("bad.png", "truncated"), _item(4, 5, 3)])
    assert b.images.shape == (2, 3, 4, 5) and b.images.dtype == torch.uint8
    assert b.indices.tolist() == [0, 3] and b.targets.tolist() == [0, 1] and b.mask is None
    assert [s.path for s in b.skipped] == ["bad.png"]


def test_variable_sizes_need_resize_or_padding() -> None:
    items = [_item(4, 5, 1), _item(6, 3, 2)]
    with pytest.raises(LaunchError) as e:
        collate_uint8(items)
    assert "data.resize" in str(e.value) and "data.pad_variable" in str(e.value)
    b = collate_uint8(items, pad=True)
    assert b.images.shape == (2, 3, 6, 5)
    assert b.mask is not None and b.mask[0].sum() == 20 and b.mask[1].sum() == 18
    assert (b.images[0, :, 4:, :] == 0).all() and (b.images[0, :, :4, :] == 1).all()
