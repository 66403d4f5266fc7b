"""Decode to uint8, augment in uint8, normalise on the training device.

Why uint8 until the device: ``ToTensor`` + ``Normalize`` in the workers turns every
1024 px image into 12 MB of float32 before it is even batched; uint8 is 4x smaller
through shared memory, pinning and the host-to-device copy, and the float work runs
where it is cheap (on the GPU, or once per batch in the main process on a CPU run).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.config import DataSection
from distrib.seeding import sample_seed

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here);
# they still ship and are the fastest PNG/JPEG path to uint8, so keep them quiet.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)
TV_DECODED = (".png", ".jpg", ".jpeg")  # torchvision.io decoders; others go through PIL
JPEG = (".jpg", ".jpeg")


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def _to_rgb_uint8(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) of 1/2/3/4 channels, 8 or 16 bit -> (3, H, W) uint8."""
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise BadImageError(f"unsupported pixel type {img.dtype}")
    if img.shape[0] in (1, 2):  # gray (+ alpha)
        img = img[:1].expand(3, -1, -1)
    return img[:3].contiguous()


def _pil_decode(path: str, draft: Sequence[int] | None = None) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        if draft and im.format == "JPEG":  # libjpeg's DCT scaling: 1/2, 1/4, 1/8, never below draft
            im.draft(None, (int(draft[1]), int(draft[0])))
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.int64)
            arr = (arr >> 8) if arr.max() > 255 else arr
            return _to_rgb_uint8(torch.from_numpy(arr.clip(0, 255).astype(np.uint8))[None])
        if im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            arr = (arr - arr.min()) / max(float(np.ptp(arr)), 1e-12) * 255
            return _to_rgb_uint8(torch.from_numpy(arr.round().astype(np.uint8))[None])
        rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # one copy out of PIL
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def decode_uint8(path: str | Path, draft: Sequence[int] | None = None) -> torch.Tensor:
    """Read an image as a (3, H, W) uint8 tensor; gray, RGBA and 16-bit are converted.

    ``draft`` (H, W): a JPEG may come back smaller, down to 1/8 of its size but never below
    ``draft`` in either side (libjpeg decodes fewer DCT coefficients: several times faster).
    """
    path = str(path)
    try:
        if draft and path.lower().endswith(JPEG):
            return _pil_decode(path, draft)
        if path.lower().endswith(TV_DECODED):
            from torchvision.io import ImageReadMode, decode_image, read_file

            img = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED)
            return _to_rgb_uint8(img)
        return _pil_decode(path)
    except (RuntimeError, OSError, ValueError, SyntaxError) as e:
        unreadable = _unreadable(path)  # torchvision's read_file says "aten::from_file ... API call failed"
        if unreadable:
            raise BadImageError(f"cannot read {path}: {unreadable}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadImageError(f"cannot decode {path}: {first}") from e


def _unreadable(path: str) -> str:
    """Why ``path`` cannot be opened for reading ("Permission denied", ...), or '' if it can."""
    try:
        with open(path, "rb"):
            return ""
    except OSError as e:
        return e.strerror or type(e).__name__


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) from the file's header, without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(f"cannot read the size of {path}: {e}") from e
    return h, w


PixelSource = Callable[[str, int], torch.Tensor]  # (path, sample index) -> (3, H, W) uint8


def augment_seeded(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int,
                   epoch: int, index: int) -> torch.Tensor:  # fmt: skip
    """``transform(image)`` under a forked CPU RNG seeded from (seed, epoch, index) alone.

    Every path (workers on the CPU, batches decoded on the device) augments through here, so an
    item gets the same crops and flips wherever it is decoded; v2 transforms draw their
    parameters from the CPU generator. Only that generator is seeded: ``torch.manual_seed`` would
    also queue a seeding of every lazy accelerator module, formatting a stack trace each time
    (about 2 ms an item inside a DataLoader, measured).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
        return transform(image)


@dataclass(frozen=True)
class Decoder:
    """The deterministic part of every pipeline: a file -> (3, H, W) uint8 at ``data.resize``.

    The same function fills the decoded cache and serves a run without it, so batches are
    identical either way. The transforms that follow resize again to the same size, which
    torchvision returns unchanged (no second interpolation).
    """

    resize: tuple[int, ...] = ()
    fast_jpeg: bool = False

    @staticmethod
    def from_config(data: DataSection) -> Decoder:
        return Decoder(tuple(data.resize), data.fast_jpeg)

    def key(self) -> str:
        """What decides the pixels (part of the cache's name)."""
        return f"resize={list(self.resize)},fast_jpeg={self.fast_jpeg and bool(self.resize)}"

    def __call__(self, path: str, index: int = -1) -> torch.Tensor:
        img = decode_uint8(path, self.resize if self.fast_jpeg else None)
        if self.resize:
            img = _v2().functional.resize(img, list(self.resize), antialias=True)
        return img


def _v2() -> Any:
    """torchvision's v2 transforms, imported when first used: ``import torchvision`` costs ~2 s of
    CPU (its ops import torch._dynamo), which a process that never transforms an image (a bench
    rank on synthetic batches, a user's script under ``run``) need not pay."""
    from torchvision.transforms import v2

    return v2


def _compose(steps: list[torch.nn.Module]) -> torch.nn.Module:
    v2 = _v2()
    return v2.Compose(steps) if steps else v2.Identity()


def train_transform(data: DataSection) -> torch.nn.Module:
    """Random augmentation on uint8 tensors, from the config."""
    v2 = _v2()
    steps: list[torch.nn.Module] = []
    if data.resize:
        steps.append(v2.Resize(list(data.resize), antialias=True))
    if data.crop:
        steps.append(v2.RandomResizedCrop(list(data.crop), scale=tuple(data.crop_scale), antialias=True))
    if data.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(data.hflip))
    if data.vflip > 0:
        steps.append(v2.RandomVerticalFlip(data.vflip))
    if data.rotation > 0:
        steps.append(v2.RandomRotation(data.rotation))
    return _compose(steps)


def eval_transform(data: DataSection) -> torch.nn.Module:
    """Deterministic counterpart: resize, then centre-crop to the training crop size."""
    v2 = _v2()
    steps: list[torch.nn.Module] = []
    if data.resize:
        steps.append(v2.Resize(list(data.resize), antialias=True))
    if data.crop:
        steps.append(
            v2.CenterCrop(list(data.crop)) if data.resize else v2.Resize(list(data.crop), antialias=True)
        )
    return _compose(steps)


class Normalizer:
    """uint8 (B, 3, H, W) on the device -> normalised float, in one fused pass.

    ``mean``/``std`` are in [0, 1] (torchvision convention) and are pre-scaled by 255 so
    the conversion is ``(x - 255 m) / (255 s)`` with no intermediate ``/ 255`` tensor.

    ``reuse=True`` writes every result into one buffer per shape, which the next call
    overwrites. On the CPU this matters: a fresh 100 MB float batch is mmap'd and
    page-faulted on every step (about 3x the cost of the arithmetic, measured). The
    training loop consumes a batch (forward and backward) before asking for the next,
    so it can reuse; anything that keeps batches must not. CUDA's caching allocator
    already reuses memory, so there it changes nothing.

    On the CPU (float32) the work runs block by block (1 MB of float32, one channel of one
    image), converted and shifted in one numpy pass and scaled in a second while the block sits
    in the core's L2 cache, on the calling thread only. Measured on 8 x 3 x 1024 x 1024, 2 cores:
    23 ms of CPU against 33 ms for the three whole-tensor passes; with DataLoader workers busy on
    both cores, torch's two intra-op threads made the whole-tensor passes cost 47 ms of CPU (and
    the same blocks through torch 480 ms: every small op waits on a descheduled thread), the
    numpy blocks still 23 ms. The arithmetic is the same, element by element (float32), so the
    result is identical.
    """

    BLOCK = 1 << 18  # elements per block on the CPU: 1 MB of float32

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        reuse: bool = False,
    ):
        self.mean = torch.tensor([m * 255 for m in mean], device=device, dtype=dtype).view(1, -1, 1, 1)
        self.inv_std = torch.tensor([1 / (s * 255) for s in std], device=device, dtype=dtype).view(
            1, -1, 1, 1
        )
        self.dtype = dtype
        self.channels_last = channels_last
        self.reuse = reuse
        self._buffer: torch.Tensor | None = None

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if not self.reuse:
            return x.to(dtype=self.dtype, memory_format=fmt)
        return self._output_buffer(x).copy_(x)

    def _output_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Where the result goes: the reused buffer, or a fresh tensor (not filled)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if not self.reuse:
            return torch.empty(x.shape, dtype=self.dtype, device=x.device, memory_format=fmt)
        buf = self._buffer
        if buf is None or buf.shape != x.shape or buf.device != x.device:
            buf = self._buffer = torch.empty(x.shape, dtype=self.dtype, device=x.device, memory_format=fmt)
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        blocked = x.device.type == "cpu" and self.dtype == torch.float32 and not self.channels_last
        if not blocked or x.dim() != 4 or x.dtype != torch.uint8 or x.numel() == 0:
            return self._output(x).sub_(self.mean).mul_(self.inv_std)
        return self._blocked(x)

    def _blocked(self, x: torch.Tensor) -> torch.Tensor:
        out = self._output_buffer(x)
        shift = self.mean.flatten().numpy()  # float32 scalars: float32 arithmetic, as torch's
        scale = self.inv_std.flatten().numpy()
        src = x.reshape(x.shape[0], x.shape[1], -1).numpy()
        dst = out.view(out.shape[0], out.shape[1], -1).numpy()
        n, step = src.shape[2], self.BLOCK
        for i in range(src.shape[0]):
            for c in range(src.shape[1]):
                for k in range(0, n, step):
                    a, b = src[i, c, k : k + step], dst[i, c, k : k + step]
                    np.subtract(a, shift[c], out=b, dtype=np.float32)
                    np.multiply(b, scale[c], out=b)
        return out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to uint8 (for previews)."""
        return (x / self.inv_std + self.mean).round_().clamp_(0, 255).to(torch.uint8)
