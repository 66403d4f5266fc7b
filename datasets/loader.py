"""From Samples to batches on the device: the dataset, its DataLoader, and epochs.

``ImageLoader`` has no ``__iter__`` on purpose: batches come from ``loader.epoch(e)``,
which sets the sampler's epoch, the workers' seeding epoch and the DataLoader's
generator before creating the iterator, so forgetting ``set_epoch`` (the classic
"every epoch has the same order" DDP bug) cannot happen through this API.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.collate import Batch, Encoded, Skipped, collate_uint8
from datasets.device_decode import DeviceDecoder, device_decode_wanted
from datasets.folder import Samples
from datasets.samplers import BalancedSampler, ExactEvalSampler, TrainSampler
from datasets.transforms import BadImageError, Decoder, PixelSource, augment_seeded
from datasets.workerwatch import never_started, watched
from distrib.config import Config
from distrib.context import DistContext
from distrib.errors import LaunchError
from distrib.seeding import WorkerSeeder, loader_seed

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Pixels (decoded, or from the decoded cache) -> uint8 augmentation, seeded per (seed, epoch, index).

    Keys are ``(index, epoch)`` (plain ints mean epoch 0). The augmentation runs under a
    forked torch RNG seeded from the key, so it neither depends on nor disturbs the
    worker's (or, with num_workers=0, the training process's) random state.
    """

    def __init__(
        self,
        samples: Samples,
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int,
        on_bad_image: str = "error",
        source: PixelSource | None = None,
        encoded: bool = False,
    ):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.source = source or Decoder()
        self.encoded = encoded  # hand out the file's bytes: the batch is decoded on the device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | Skipped:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path = str(self.samples.paths[index])
        if self.encoded:
            return self._encoded(path, index)
        try:
            image = self.source(path, index)
        except BadImageError as e:
            if self.on_bad_image == "skip":
                return Skipped(path, str(e), index)
            raise LaunchError(
                f"{e}. Replace or remove the file, or set data.on_bad_image = "
                "'skip' to leave such files out (they are listed in the run "
                "directory)."
            ) from None
        image = augment_seeded(self.transform, image, self.seed, epoch, index)
        return image, int(self.samples.targets[index]), index

    def _encoded(self, path: str, index: int) -> tuple[Encoded, int, int] | Skipped:
        from torchvision.io import read_file

        try:
            data = read_file(path)
        except (RuntimeError, OSError) as e:
            if self.on_bad_image == "skip":
                return Skipped(path, str(e), index)
            raise LaunchError(f"cannot read {path}: {e}") from None
        return Encoded(data), int(self.samples.targets[index]), index


@dataclass
class ImageLoader:
    """A DataLoader plus what it takes to start an epoch correctly."""

    loader: DataLoader
    seed: int
    rank: int
    device_decoder: DeviceDecoder | None = None  # data.decode_on = 'cuda'
    warm: Callable[[], bool] | None = None  # the decoded cache holds the whole split
    split: str = "training"  # or validation: named in what the loader says
    _said_warm: bool = False

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Batches of ``epoch``, with every epoch-dependent seed set first."""
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        if isinstance(self.loader.worker_init_fn, WorkerSeeder):
            self.loader.worker_init_fn.epoch = epoch
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(loader_seed(self.seed, self.rank, epoch))
        if self.warm is not None and self.warm():
            if not self._said_warm:
                self._said_warm = True
                log.info(
                    "the decoded cache holds every %s image: its epochs are read in this process, "
                    "without DataLoader workers (data.cache_read = 'inline')",
                    self.split,
                )
            return unwrap_worker_errors(inline_batches(self.loader))
        batches = unwrap_worker_errors(watched(iter(self.loader), self.rank))
        if self.device_decoder is None:
            return batches
        return (self.device_decoder(b, epoch) for b in batches)


def inline_batches(loader: DataLoader) -> Iterator[Batch]:
    """One epoch of ``loader``'s batches, made in this process (data.cache_read = 'inline').

    For a warm decoded cache: an item is then a read from the page cache and a flip, and
    DataLoader worker processes cost more than the item itself: a fork per worker every epoch,
    and a fresh shared-memory block per batch that the worker and this process both page-fault
    (measured: ~10,000 faults and ~75 ms of worker CPU per batch of 8 x 1024 px, against ~35 ms
    here). The same batch sampler, dataset and collate make the same batches. Not threads:
    the augmentation seeds torch's global CPU generator per item, which a training thread
    drawing at the same time (dropout on a CPU run) would see.
    """
    pin = loader.pin_memory and torch.cuda.is_available()
    for keys in loader.batch_sampler:  # type: ignore[union-attr]
        batch = loader.collate_fn([loader.dataset[k] for k in keys])
        yield batch.pin_memory() if pin else batch


_ORIGINAL = re.compile(r"^(?:[\w.]+\.)?(LaunchError|BadImageError): (.*)$", re.S | re.M)


def unwrap_worker_errors(it: Iterator[Batch]) -> Iterator[Batch]:
    """A user error raised in a worker comes back wrapped in its traceback: unwrap it."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (LaunchError, BadImageError) as e:
            text = str(e)
            if "Original Traceback" in text:
                match = list(_ORIGINAL.finditer(text))
                text = match[-1].group(2).strip() if match else text
            raise LaunchError(text) from e
        yield batch


_WORKER_DIED = re.compile(
    r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (is killed by signal: (\w+)|exited unexpectedly)"
)


def worker_death(error: BaseException, rank: int, num_workers: int) -> LaunchError | None:
    """torch's "DataLoader worker (pid N) is killed by signal: Killed" as one line with the usual cause.

    A worker killed by SIGKILL is almost always the kernel's OOM killer: every worker holds its
    own copy of what the dataset object carries, plus prefetched batches.
    """
    m = _WORKER_DIED.search(str(error))
    if m is None:
        return None
    stuck = never_started([int(p) for p in m.group(1).replace(",", " ").split()], rank)
    if stuck is not None:
        return LaunchError(stuck)
    how = f"was killed by signal {m.group(3)}" if m.group(3) else "exited unexpectedly"
    hint = (
        "; SIGKILL is usually the kernel's OOM killer (see `dmesg`): lower data.num_workers "
        f"(now {num_workers}) or data.batch_size, or give the job more host memory"
        if m.group(3) == "Killed" or not m.group(3)
        else ""
    )
    return LaunchError(f"rank {rank}: DataLoader worker (pid {m.group(1)}) {how}{hint}")


def make_sampler(samples: Samples, ctx: DistContext, spec: LoaderSpec) -> Sampler:
    """Training: the epoch's global order in steps of the global batch; else exact eval shards."""
    if not spec.train:
        return ExactEvalSampler(len(samples), ctx)
    global_batch = spec.batch_size * ctx.world_size * spec.accum
    if spec.sampler == "balanced":
        return BalancedSampler(samples.targets, ctx, spec.seed, global_batch)
    return TrainSampler(len(samples), ctx, spec.seed, global_batch)


@dataclass(frozen=True)
class LoaderSpec:
    """How a rank's loader batches: everything but the samples, the transform and the rank."""

    seed: int
    batch_size: int
    num_workers: int = 0
    train: bool = False  # training: shuffled (or balanced) shards; else exact eval shards
    sampler: str = "distributed"  # training only: distributed or balanced
    on_bad_image: str = "error"
    pad_variable: bool = False
    decoder: Decoder = Decoder()  # file -> pixels at data.resize (the transform resizes otherwise)
    decode_on_device: bool = False  # JPEG batches decoded on the rank's device (data.decode_on)
    cache_inline: bool = True  # a warm decoded cache is read in this process (data.cache_read)
    accum: int = 1  # micro-batches per optimizer step: the global batch is batch_size x ranks x accum

    @staticmethod
    def from_config(cfg: Config, *, train: bool) -> LoaderSpec:
        """The loader ``launch.py train`` builds for the training or the validation split."""
        d = cfg.data
        sampler = d.sampler if train else "distributed"
        return LoaderSpec(
            cfg.run.seed,
            d.batch_size,
            d.num_workers,
            train,
            sampler,
            d.on_bad_image,
            d.pad_variable,
            Decoder.from_config(d),
            d.decode_on == "cuda",
            d.cache_read == "inline",
            cfg.train.accum_steps,
        )


def build_loader(
    samples: Samples,
    transform: Callable[[torch.Tensor], torch.Tensor],
    ctx: DistContext,
    spec: LoaderSpec,
    source: PixelSource | None = None,
    **loader_kw: Any,
) -> ImageLoader:
    """A seeded, sharded DataLoader of uint8 batches for this rank.

    ``source``: where pixels come from (the decoded cache); by default ``spec.decoder``.
    """
    seed, batch_size = spec.seed, spec.batch_size
    on_device = (
        spec.decode_on_device
        and source is None
        and device_decode_wanted(samples, spec.decoder.resize, "training" if spec.train else "validation")
    )
    dataset = ImageDataset(samples, transform, seed, spec.on_bad_image, source or spec.decoder, on_device)
    smp = make_sampler(samples, ctx, spec)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=smp,
        num_workers=spec.num_workers,
        collate_fn=functools.partial(collate_uint8, pad=spec.pad_variable),
        pin_memory=ctx.is_cuda,
        worker_init_fn=WorkerSeeder(seed, ctx.rank),
        generator=torch.Generator().manual_seed(loader_seed(seed, ctx.rank, 0)),
        persistent_workers=False,
        **loader_kw,
    )
    skip = spec.on_bad_image == "skip"
    gpu = (
        DeviceDecoder(samples, transform, spec.decoder.resize, seed, ctx.device, skip) if on_device else None
    )
    warm = getattr(source, "warm", None) if spec.cache_inline else None  # a CachedSource
    return ImageLoader(loader, seed, ctx.rank, gpu, warm, "training" if spec.train else "validation")
