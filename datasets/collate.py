"""Batches of uint8 images: stacked as they are, or padded with a mask when sizes vary."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import default_collate

from distrib.errors import LaunchError


@dataclass(frozen=True)
class Encoded:
    """A JPEG file's bytes, to be decoded on the training device (data.decode_on = 'cuda')."""

    data: torch.Tensor  # (N,) uint8


@dataclass(frozen=True)
class Skipped:
    """An item whose file could not be decoded (data.on_bad_image = 'skip')."""

    path: str
    reason: str
    index: int = -1  # its dataset index: the sample ledger counts it as consumed


@dataclass
class Batch:
    """One batch on its way to the device. ``images`` stay uint8 until normalised there."""

    images: torch.Tensor  # (B, 3, H, W) uint8
    targets: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64 dataset indices
    mask: torch.Tensor | None = None  # (B, H, W) bool, True on real pixels (padding collate)
    skipped: list[Skipped] = field(default_factory=list)
    # data.decode_on = 'cuda': the items' JPEG files, concatenated (one shared-memory block from a
    # worker, not one file descriptor per image), and each file's length
    encoded: torch.Tensor | None = None
    encoded_sizes: tuple[int, ...] = ()

    def files(self) -> list[torch.Tensor]:
        """Each item's JPEG bytes (views of ``encoded``)."""
        return [] if self.encoded is None else list(torch.split(self.encoded, list(self.encoded_sizes)))

    def __len__(self) -> int:
        return len(self.targets)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return Batch(
            self.images.pin_memory(),
            self.targets.pin_memory(),
            self.indices.pin_memory(),
            None if self.mask is None else self.mask.pin_memory(),
            self.skipped,
            self.encoded,
            self.encoded_sizes,
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            move(self.images),
            move(self.targets),
            move(self.indices),
            None if self.mask is None else move(self.mask),
            self.skipped,
            self.encoded,
            self.encoded_sizes,
        )


def _pad(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h = max(t.shape[1] for t in images)
    w = max(t.shape[2] for t in images)
    out = torch.zeros(len(images), 3, h, w, dtype=torch.uint8)
    mask = torch.zeros(len(images), h, w, dtype=torch.bool)
    for i, t in enumerate(images):
        out[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = True
    return out, mask


def collate_uint8(items: list[tuple[torch.Tensor, int, int] | Skipped], pad: bool = False) -> Batch:
    """Stack (image, target, index) items; skipped files travel along for reporting."""
    skipped = [it for it in items if isinstance(it, Skipped)]
    good = [it for it in items if not isinstance(it, Skipped)]
    if not good:
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), empty, empty, None, skipped)
    images = [it[0] for it in good]
    targets = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    if isinstance(images[0], Encoded):  # decoded later, on the device
        placeholder = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        sizes = tuple(len(e.data) for e in images)
        return Batch(placeholder, targets, indices, None, skipped, torch.cat([e.data for e in images]), sizes)
    sizes = {tuple(t.shape[1:]) for t in images}
    if len(sizes) == 1:
        # default_collate stacks straight into shared memory inside a worker, saving the
        # copy the worker queue would otherwise make
        return Batch(default_collate(images), targets, indices, None, skipped)
    if not pad:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
        raise LaunchError(
            f"images in one batch have different sizes ({shown}): set data.resize = "
            "[H, W] to resize them, or data.pad_variable = true to pad with a mask"
        )
    stacked, mask = _pad(images)
    return Batch(stacked, targets, indices, mask, skipped)
