"""The configuration's schema: every section and key, its type, default, documentation and range.

Why apart from distrib/config.py: this is what a run *is* (read by every module that takes a
Config); reading TOML, typing ``--set`` values, checking ranges and printing is how it gets
filled in. This module must not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distrib.errors import LaunchError


class ConfigError(LaunchError, ValueError):
    """A configuration problem; the message lists every error found, one per line."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


@dataclass(frozen=True)
class Range:
    """An allowed numeric interval; ``None`` ends are open to infinity."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @staticmethod
    def parse(text: str) -> Range:
        """Interval notation: '[0, 1]', '(0, 1]', '[1, inf)', '(-inf, 0)'."""
        m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])", text)
        if not m:
            raise ValueError(f"not an interval: {text!r}")
        lo, hi = (None if abs(float(v)) == math.inf else float(v) for v in (m.group(2), m.group(3)))
        return Range(lo, hi, lo_open=m.group(1) == "(", hi_open=m.group(4) == ")")

    def __contains__(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(x: float | None) -> str:
    return repr(x) if not isinstance(x, float) or not x.is_integer() else str(int(x))


def _f(default: Any, doc: str, choices: tuple[str, ...] | None = None, within: str | None = None) -> Any:
    """A dataclass field carrying its documentation and, for numbers, its allowed range.

    ``within`` is an interval such as '[0, 1)' or '(0, inf)'. It is checked at load time for
    the value (or each item of a list), so an out-of-range number is a config error naming
    the key, never a torch or numpy error.
    """
    meta: dict[str, Any] = {"doc": doc}
    if choices:
        meta["choices"] = choices
    if within:
        meta["range"] = Range.parse(within)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSection:
    """Where a run writes and how it is seeded."""

    name: str = _f("", "Run directory name under out_dir; empty = a timestamped name.")
    out_dir: str = _f("runs", "Folder that holds run directories (relative to the cwd).")
    seed: int = _f(
        0,
        "Base seed (any 64-bit integer); per-rank/worker/epoch seeds are derived from it.",
        within="[-9223372036854775808, 18446744073709551616)",
    )
    deterministic: bool = _f(
        False,
        "Deterministic kernels: cudnn.deterministic, no cudnn.benchmark, "
        "torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG.",
    )
    overwrite: bool = _f(
        False,
        "Start a new run in a run directory that holds an earlier run: its files are removed "
        "first. Without it such a start is refused (resume it, or pick another run.name).",
    )

    def __post_init__(self) -> None:
        if self.name in (".", "..") or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"run.name: {self.name!r} must be a plain folder name (no '/', '.', '..')")


@dataclass(frozen=True)
class LaunchSection:
    """How processes and GPUs are laid out (CLI flags override these)."""

    gpus: tuple[int, ...] = _f(
        (),
        "Physical GPU ids (nvidia-smi / PCI bus order) to use, e.g. [0, 2]; empty = "
        "leave CUDA_VISIBLE_DEVICES as it is. Overridden by --gpus.",
        within="[0, inf)",
    )
    log_ranks: str = _f("0", "Ranks whose INFO logs are shown: '0', 'all' or a list like '0,3'.")


@dataclass(frozen=True)
class DistSection:
    """Process-group settings."""

    backend: str = _f(
        "auto",
        "Collective backend: auto = nccl when CUDA is usable, else gloo.",
        choices=("auto", "nccl", "gloo"),
    )
    timeout_s: float = _f(
        600.0, "Seconds a rank waits for the others (init, barriers, collectives).", within="(0, inf)"
    )


@dataclass(frozen=True)
class DataSection:
    """Where images come from and how they become batches (see datasets/)."""

    root: str = _f("", "ImageFolder root (one sub-folder per class). Or use csv + images.")
    csv: str = _f("", "Label CSV for a flat image folder (e.g. train_df.csv); needs images.")
    images: str = _f("", "Flat image folder the CSV's file names are relative to.")
    synthetic: int = _f(
        0,
        "If > 0 and data.csv does not exist: write a demo set of this many images per class there.",
        within="[0, inf)",
    )
    file_col: str = _f("file_name", "CSV column with the image file name (may hold sub-folders).")
    label_col: str = _f("label", "CSV column with the class label.")
    cache_dir: str = _f(
        ".cache/organized",
        "Where csv + images are organised (hard links) into an ImageFolder tree, kept in step "
        "with the CSV's rows.",
    )
    val_root: str = _f("", "Separate validation ImageFolder; empty = split val_fraction off root.")
    val_fraction: float = _f(
        0.3, "Share of each class held out for validation (stratified, seeded).", within="[0, 1)"
    )
    batch_size: int = _f(32, "Images per batch on each rank.", within="[1, inf)")
    num_workers: int = _f(2, "DataLoader worker processes per rank.", within="[0, inf)")
    resize: tuple[int, ...] = _f((), "Resize every image to [H, W]; empty = keep sizes.", within="[1, inf)")
    crop: tuple[int, ...] = _f((), "Training RandomResizedCrop [H, W]; empty = none.", within="[1, inf)")
    crop_scale: tuple[float, ...] = _f(
        (0.08, 1.0), "RandomResizedCrop area range [min, max].", within="(0, 1]"
    )
    hflip: float = _f(0.5, "Probability of a horizontal flip (training).", within="[0, 1]")
    vflip: float = _f(0.0, "Probability of a vertical flip (training).", within="[0, 1]")
    rotation: float = _f(0.0, "Random rotation range in degrees, +/- (training); 0 = off.", within="[0, 180]")
    mean: str | tuple[float, ...] = _f(
        "auto",
        "Per-channel mean in [0, 1], or 'auto' = exact dataset stats, computed and cached.",
        within="[0, 1]",
    )
    std: str | tuple[float, ...] = _f(
        "auto", "Per-channel std in (0, 1], or 'auto' (with mean).", within="(0, 1]"
    )
    sampler: str = _f(
        "distributed",
        "Training sampler: distributed (shuffled shards) or balanced (class-balanced draw).",
        choices=("distributed", "balanced"),
    )
    on_bad_image: str = _f(
        "error",
        "A corrupt/truncated image: error (name it and stop) or skip (log, list, count).",
        choices=("error", "skip"),
    )
    pad_variable: bool = _f(False, "Batch images of different sizes by padding (with a mask).")
    channels_last: bool = _f(False, "Hand the model channels_last batches.")
    stats_cache: str = _f(".cache/stats", "Where mean = 'auto' stores computed stats per dataset.")
    cache: str = _f(
        "off",
        "disk = keep decoded, resized pixels in one memory-mapped file under cache_dir, filled in "
        "the first epoch (or by `launch.py cache`) and read by every worker and rank after; off = "
        "decode every image every epoch.",
        choices=("off", "disk"),
    )
    cache_read: str = _f(
        "inline",
        "How epochs read a warm decoded cache (every image of the split in it): inline = "
        "read, augment and batch in the training process, no DataLoader worker processes (no fork "
        "per epoch, no shared memory per batch: the fastest for flips and crops); workers = keep "
        "the DataLoader workers (heavy per-image augmentation on a GPU host).",
        choices=("inline", "workers"),
    )
    decode_on: str = _f(
        "cpu",
        "cuda = decode JPEG batches on the GPU (torchvision.io.decode_jpeg), then resize and augment "
        "there; needs data.resize; splits with other formats, CPU runs and data.cache = 'disk' decode "
        "on the CPU (said once).",
        choices=("cpu", "cuda"),
    )
    fast_jpeg: bool = _f(
        True,
        "Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when data.resize is at most "
        "that share of the source, then resize; false = always decode at full size.",
    )

    def __post_init__(self) -> None:
        errors = []
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value and len(value) != 2:
                errors.append(f"data.{name}: give [H, W], got {list(value)}")
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            errors.append(f"data.crop_scale: give [min, max] with min <= max, got {list(self.crop_scale)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (isinstance(value, str) and value != "auto") or (
                not isinstance(value, str) and len(value) != 3
            ):
                errors.append(f"data.{name}: 'auto' or three numbers, got {value!r}")
        if isinstance(self.mean, str) != isinstance(self.std, str):
            errors.append("data.mean and data.std: both 'auto' or both given")
        if errors:
            raise ValueError("; ".join(errors))


SHAPE_KEYS = ("name", "batchnorm", "width")  # [model] keys that decide a state dict's tensors


@dataclass(frozen=True)
class ModelSection:
    """Which network to train."""

    name: str = _f(
        "small_cnn",
        "small_cnn, a torchvision.models name (resnet18, resnet50, ...), or your own 'module:Class' "
        "(called with num_classes=; importable on every rank).",
    )
    weights: str = _f("", "Pretrained weights from a local file (nothing is downloaded); empty = none.")
    weights_strict: bool = _f(
        True,
        "model.weights must fit every tensor (a classifier head for another class count is "
        "the one exception); false = load what fits and log how much.",
    )
    batchnorm: bool = _f(True, "small_cnn only: BatchNorm after each conv (false = norm-free).")
    width: int = _f(32, "small_cnn only: channels of the first conv (doubles per stage).", within="[1, inf)")
    dropout: float = _f(0.0, "small_cnn only: dropout probability before the head.", within="[0, 1)")


@dataclass(frozen=True)
class OptimSection:
    """Optimizer and learning-rate schedule."""

    name: str = _f("sgd", "sgd or adamw.", choices=("sgd", "adamw"))
    lr: float = _f(0.1, "Peak learning rate (after warm-up), for the global batch.", within="(0, inf)")
    momentum: float = _f(0.9, "SGD momentum.", within="[0, 1]")
    weight_decay: float = _f(5e-4, "Weight decay.", within="[0, inf)")
    schedule: str = _f(
        "cosine", "cosine, step or constant (after warm-up).", choices=("cosine", "step", "constant")
    )
    warmup_epochs: float = _f(0.0, "Linear warm-up length in epochs (fractions allowed).", within="[0, inf)")
    step_epochs: int = _f(30, "step schedule: epochs between decays.", within="[1, inf)")
    gamma: float = _f(0.1, "step schedule: decay factor.", within="(0, 1]")


@dataclass(frozen=True)
class TrainSection:
    """The epoch loop."""

    epochs: int = _f(10, "Epochs to train.", within="[1, inf)")
    max_steps: int = _f(0, "Stop after this many optimizer steps in total (0 = no limit).", within="[0, inf)")
    label_smoothing: float = _f(0.0, "Cross-entropy label smoothing.", within="[0, 1)")
    grad_clip: float = _f(0.0, "Clip the global gradient norm to this (0 = off).", within="[0, inf)")
    accum_steps: int = _f(1, "Gradient accumulation: micro-batches per optimizer step.", within="[1, inf)")
    global_batch: int = _f(
        0,
        "Images per optimizer step over all ranks (0 = data.batch_size x ranks x accum_steps). Kept "
        "when a run resumes on another number of ranks; data.batch_size is then the most per rank.",
        within="[0, inf)",
    )
    amp: str = _f(
        "off",
        "Mixed precision on CUDA: off, bf16 or fp16 (with GradScaler).",
        choices=("off", "bf16", "fp16"),
    )
    log_every: int = _f(
        20, "Progress line (rank 0) and steps.csv row every N optimizer steps.", within="[1, inf)"
    )


@dataclass(frozen=True)
class ParallelSection:
    """How the model is replicated."""

    mode: str = _f(
        "auto",
        "auto (ddp when world size > 1, else none), none, dp, ddp.",
        choices=("auto", "none", "dp", "ddp"),
    )
    sync_bn: bool = _f(False, "Convert BatchNorm to SyncBatchNorm under ddp.")


@dataclass(frozen=True)
class CheckpointSection:
    """When and where rank 0 saves, and how to resume."""

    every_epoch: bool = _f(True, "Save at the end of every epoch.")
    every_steps: int = _f(0, "Also save every N optimizer steps (0 = off).", within="[0, inf)")
    keep_last: int = _f(
        2, "How many recent checkpoints to keep (best.pt is kept as well).", within="[1, inf)"
    )
    dir: str = _f("", "Checkpoint folder; empty = <run dir>/checkpoints.")
    resume: str = _f("", "'' (fresh), 'auto' (newest valid checkpoint of this run name) or a path.")

    def folder(self, run_dir: Path) -> Path:
        """Where checkpoints go: ``dir``, or ``<run dir>/checkpoints`` when it is empty."""
        return Path(self.dir) if self.dir else run_dir / "checkpoints"


@dataclass(frozen=True)
class MemorySection:
    """The memory monitor and leak detector (train; always on in run and memcheck)."""

    enabled: bool = _f(True, "Monitor memory during train: memory_rank<N>.csv, memory.png, leak verdicts.")
    interval_s: float = _f(
        1.0, "Background sampler period (catches peaks between steps), seconds.", within="(0, inf)"
    )
    warmup_steps: int = _f(
        20, "Steps not judged at the start (allocator and caches settle).", within="[0, inf)"
    )
    check_every: int = _f(25, "Steps between leak checks.", within="[1, inf)")
    min_steps: int = _f(40, "Steps after warm-up before a leak can be called.", within="[3, inf)")
    min_rate_kb: float = _f(
        1.0, "Growth that counts as a leak: at least this many KiB per step ...", within="(0, inf)"
    )
    min_growth_mb: float = _f(
        2.0,
        "... and at least this many MiB over the judged steps (plus, with several ranks, the ~2 MiB the "
        "flight recorder fills).",
        within="(0, inf)",
    )
    census_gap: int = _f(
        20, "Steps between the two counts of live tensors once a leak is suspected.", within="[1, inf)"
    )
    on_leak: str = _f(
        "warn",
        "warn (log the verdict), fail (stop every rank at the same step, non-zero exit), snapshot "
        "(CUDA: record allocation history and dump a memory_viz file, then warn).",
        choices=("warn", "fail", "snapshot"),
    )
    require_free: bool = _f(False, "Refuse to start when another process holds memory on an assigned GPU.")


@dataclass(frozen=True)
class TimingSection:
    """Where each rank's step time goes (train): timing_rank<N>.csv, stragglers named with a cause."""

    enabled: bool = _f(True, "Time every optimizer step's phases on every rank (data, compute, comm, ...).")
    window: int = _f(
        20, "Steps per window: the ranks compare their phase medians once a window.", within="[2, inf)"
    )
    ratio: float = _f(
        1.5,
        "A rank whose compute or data wait is at least this times the other ranks' median is slow ...",
        within="(1, inf)",
    )
    min_share: float = _f(
        0.05,
        "... and only when the excess is at least this share of the step (tiny phases are noise).",
        within="[0, 1]",
    )
    patience: int = _f(
        3, "Windows in a row a rank must be slow before it is named a straggler.", within="[1, inf)"
    )
    on_straggler: str = _f(
        "warn",
        "warn (name the rank and the likely cause, once per episode), fail (stop every rank at the same "
        "step, non-zero exit).",
        choices=("warn", "fail"),
    )


@dataclass(frozen=True)
class LoggingSection:
    """Where train's figures go besides steps.csv, metrics.csv and the per-rank CSVs."""

    tensorboard: bool = _f(
        False,
        "Write TensorBoard event files under <run dir>/tensorboard/rank<N> (needs the [tb] extra); view "
        "them with: tensorboard --logdir runs",
    )


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration: one frozen value passed explicitly."""

    run: RunSection = field(default_factory=RunSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    dist: DistSection = field(default_factory=DistSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    memory: MemorySection = field(default_factory=MemorySection)
    timing: TimingSection = field(default_factory=TimingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
