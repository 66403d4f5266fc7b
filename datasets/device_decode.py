"""``data.decode_on = "cuda"``: JPEG batches decoded on the training device.

Why: on a GPU host the CPU cores that feed eight GPUs are the bottleneck of a 1024 px
JPEG pipeline; nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) decodes a whole batch
on the GPU. DataLoader workers then only read the files' bytes; the main process decodes
the batch on the device, resizes each image to ``data.resize`` and runs its augmentation
there, under the same per-item seed ``(seed, epoch, index)`` as on the CPU (v2 transforms
draw their parameters from the CPU generator, which is what the seed forks), so the same
crops and flips are chosen. The pixels differ slightly from a CPU decode (nvJPEG's IDCT
and upsampling, and the GPU's resize); the CPU path is the reference.

A split whose files are not all JPEGs stays on the CPU (said once): a batch is decoded in
one call, and PNG has no GPU decoder in torchvision. The same code runs with ``device =
cpu`` (torchvision's batched CPU decode), which is how it is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch

from datasets.collate import Batch, Skipped
from datasets.folder import Samples
from datasets.transforms import JPEG, augment_seeded
from distrib.errors import LaunchError

log = logging.getLogger(__name__)


def all_jpeg(samples: Samples) -> bool:
    return bool(len(samples)) and all(str(p).lower().endswith(JPEG) for p in samples.paths)


def device_decode_wanted(samples: Samples, resize: Sequence[int], what: str) -> bool:
    """Whether this split can be decoded on the device; says why not, once."""
    if not resize:
        raise LaunchError(
            "data.decode_on = 'cuda' stacks decoded images on the device, so they need one size: "
            "set data.resize = [H, W] (or data.decode_on = 'cpu')"
        )
    if not all_jpeg(samples):
        others = sorted(
            {str(p).rsplit(".", 1)[-1].lower() for p in samples.paths if not str(p).lower().endswith(JPEG)}
        )
        log.info(
            "data.decode_on = 'cuda': the %s split holds %s files, not only JPEGs; it decodes on the CPU",
            what,
            "/".join(others[:4]),
        )
        return False
    return True


class DeviceDecoder:
    """Decode a batch of JPEG bytes on ``device``, resize, and augment each item as its seed says."""

    def __init__(
        self,
        samples: Samples,
        transform: Callable[[torch.Tensor], torch.Tensor],
        resize: Sequence[int],
        seed: int,
        device: torch.device | str,
        skip_bad: bool = False,
    ):
        self.samples, self.transform, self.resize = samples, transform, list(resize)
        self.seed, self.device, self.skip_bad = seed, torch.device(device), skip_bad

    def _decode(self, batch: Batch) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(batch.files(), mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the call: find it, item by item
            out: list[torch.Tensor | None] = []
            for data, index in zip(batch.files(), batch.indices.tolist(), strict=True):
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    path = str(self.samples.paths[index])
                    if not self.skip_bad:
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise LaunchError(
                            f"cannot decode {path} on {self.device}: {first}. Replace or remove the file, "
                            "or set data.on_bad_image = 'skip' to leave such files out"
                        ) from None
                    out.append(None)
            return out

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        if batch.encoded is None:
            return batch
        from torchvision.transforms.v2.functional import resize

        images, keep = [], []
        skipped = list(batch.skipped)
        for pos, (img, index) in enumerate(zip(self._decode(batch), batch.indices.tolist(), strict=True)):
            if img is None:
                skipped.append(Skipped(str(self.samples.paths[index]), "cannot decode", int(index)))
                continue
            img = resize(img, self.resize, antialias=True)
            images.append(augment_seeded(self.transform, img, self.seed, epoch, index))
            keep.append(pos)
        if not images:
            empty = torch.zeros(0, dtype=torch.int64)
            return Batch(
                torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=self.device), empty, empty, None, skipped
            )
        rows = torch.tensor(keep, dtype=torch.int64)
        return dataclasses.replace(
            batch,
            images=torch.stack(images),
            targets=batch.targets[rows],
            indices=batch.indices[rows],
            skipped=skipped,
            encoded=None,
            encoded_sizes=(),
        )
