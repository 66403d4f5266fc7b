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


def test_normalizer_blocks_on_the_cpu_give_the_whole_tensor_result(monkeypatch) -> None:
    """The CPU path (per channel, block by block) is the same arithmetic as one broadcast pass."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (3, 3, 37, 29), dtype=torch.uint8)
    m = torch.tensor([v * 255 for v in mean]).view(1, 3, 1, 1)
    s = torch.tensor([1 / (v * 255) for v in std]).view(1, 3, 1, 1)
    whole = x.float().sub_(m).mul_(s)
    monkeypatch.setattr(Normalizer, "BLOCK", 100)  # several blocks per plane, a ragged last one
    for reuse in (False, True):
        norm = Normalizer(mean, std, "cpu", reuse=reuse)
        assert torch.equal(norm(x), whole)
        assert torch.equal(norm(x[1:]), whole[1:])  # a smaller batch
    strided = x[:, :, ::2, ::3]  # not contiguous
    assert torch.equal(Normalizer(mean, std, "cpu")(strided), strided.float().sub_(m).mul_(s))


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


def _smooth_jpeg(path: Path, h: int = 256, w: int = 192) -> Path:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path


def test_a_jpeg_decodes_at_the_smallest_dct_scale_not_below_the_target(tmp_path: Path) -> None:
    jpg = _smooth_jpeg(tmp_path / "a.jpg")
    assert decode_uint8(jpg).shape == (3, 256, 192)
    assert decode_uint8(jpg, draft=(64, 48)).shape == (3, 64, 48)  # 1/4
    assert decode_uint8(jpg, draft=(100, 60)).shape == (3, 128, 96)  # 1/2: 1/4 would be below 100
    assert decode_uint8(jpg, draft=(200, 60)).shape == (3, 256, 192)  # no scale fits
    png = tmp_path / "a.png"
    Image.open(jpg).save(png)
    assert decode_uint8(png, draft=(64, 48)).shape == (3, 256, 192)  # not a JPEG: full size


def test_fast_jpeg_is_close_to_a_full_decode_and_resize(tmp_path: Path) -> None:
    from datasets.transforms import Decoder

    jpg = _smooth_jpeg(tmp_path / "a.jpg")
    fast, full = Decoder((60, 40), fast_jpeg=True)(str(jpg)), Decoder((60, 40), fast_jpeg=False)(str(jpg))
    assert fast.shape == full.shape == (3, 60, 40)
    mse = ((fast.double() - full.double()) ** 2).mean().item()
    assert mse > 0 and 10 * np.log10(255**2 / mse) > 35  # different pixels, within 35 dB PSNR
    assert torch.equal(Decoder((60, 40), fast_jpeg=False)(str(jpg)), full)  # deterministic
