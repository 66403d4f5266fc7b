"""The engine and its step: model, optimizer, schedule, AMP, and one optimizer step.

What the loop (distrib/engine/train.py) repeats, kept apart from it so a benchmark or a
monitor can build the same engine and drive the same step:
  - ``assemble`` builds everything a step touches from the config and a ``Feed``;
  - ``forward_backward`` runs one micro-batch (normalised on the device, autocast, no_sync
    while accumulating) and turns CUDA out-of-memory into advice;
  - ``optimizer_step`` unscales, stops on non-finite gradients on every rank at the same
    step (DDP's averaged gradients make a NaN on any rank visible on all), clips, steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datasets.transforms import Normalizer
from distrib.config import Config
from distrib.context import DistContext
from distrib.engine.models import build_model
from distrib.engine.parallel import resolve_mode, unwrap, wrap
from distrib.errors import LaunchError
from distrib.hang import Watch
from distrib.seeding import INIT, derive_seed, seed_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Feed:
    """What the engine trains on: loaders, normalisation and the class list.

    ``train``/``val`` are ImageLoaders, or anything with ``epoch(e)``, ``sampler`` and
    ``loader.batch_size`` (the overhead benchmark feeds in-memory batches).
    """

    train: Any
    val: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass
class Engine:
    """Everything a step touches, built once by :func:`assemble`."""

    model: nn.Module  # wrapped for the parallel mode
    bare: nn.Module  # what checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    normalizer: Normalizer
    criterion: nn.Module
    mode: str
    amp_dtype: torch.dtype | None
    feed: Feed
    steps_per_epoch: int  # optimizer steps of the global batch: the same at every world size
    global_batch: int  # images per optimizer step over all ranks

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def set_determinism(cfg: Config) -> None:
    """Choose deterministic or fast kernels (run.deterministic)."""
    det = cfg.run.deterministic
    torch.backends.cudnn.deterministic = det
    torch.backends.cudnn.benchmark = not det
    torch.use_deterministic_algorithms(det)


def lr_factor(step: int, total: int, warmup: int, schedule: str, step_every: int, gamma: float) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (pure: the schedule is a formula)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** ((step - warmup) // max(step_every, 1))
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def make_scheduler(
    cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then the configured schedule, in optimizer steps of the global batch."""
    t, o = cfg.train, cfg.optim
    total = max(1, steps_per_epoch * t.epochs)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    every = o.step_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, o.schedule, every, o.gamma)
    )


def amp_dtype(ctx: DistContext, cfg: Config) -> torch.dtype | None:
    if cfg.train.amp != "off" and not ctx.is_cuda:
        log.warning("train.amp = %r needs CUDA; training in float32 on the CPU", cfg.train.amp)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if ctx.is_cuda else None


def assemble(ctx: DistContext, cfg: Config, feed: Feed) -> Engine:
    """Model (wrapped for the parallel mode), optimizer, schedule, AMP, normaliser."""
    # seeded right here: whatever ran before (stats, caches) must not change the init
    seed_process(derive_seed(cfg.run.seed, INIT))
    bare = build_model(cfg.model, len(feed.classes)).to(ctx.device)
    if cfg.data.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    mode = resolve_mode(cfg.parallel.mode, ctx)
    model = wrap(bare, ctx, mode, cfg.parallel.sync_bn)
    opt = make_optimizer(cfg, model)
    dtype = amp_dtype(ctx, cfg)
    steps = max(1, len(feed.train) // cfg.train.accum_steps)
    return Engine(
        model=model,
        bare=unwrap(model),
        optimizer=opt,
        scheduler=make_scheduler(cfg, opt, steps),
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        normalizer=Normalizer(
            feed.mean, feed.std, ctx.device, channels_last=cfg.data.channels_last, reuse=True
        ),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        mode=mode,
        amp_dtype=dtype,
        feed=feed,
        steps_per_epoch=steps,
        global_batch=feed.train.loader.batch_size * ctx.world_size * cfg.train.accum_steps,
    )


def check_batch_fits(ctx: DistContext, cfg: Config, total: int) -> None:
    """An epoch is (N // G) optimizer steps of the global batch G: at least one must fit."""
    g = cfg.data.batch_size * ctx.world_size * cfg.train.accum_steps
    if total >= g:
        return
    origin = (
        f"train.global_batch = {g}"
        if cfg.train.global_batch
        else f"data.batch_size {cfg.data.batch_size} x {ctx.world_size} rank(s) x train.accum_steps "
        f"{cfg.train.accum_steps}"
    )
    raise LaunchError(
        f"the global batch of {g} images ({origin}) is larger than the {total} training images: an "
        "epoch would train nothing; lower data.batch_size or train.global_batch, or use fewer processes"
    )


# --------------------------------------------------------------------------- the step


def autocast(eng: Engine) -> contextlib.AbstractContextManager:
    if eng.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=eng.amp_dtype)


def _no_sync(eng: Engine, sync: bool) -> contextlib.AbstractContextManager:
    if eng.mode == "ddp" and not sync:
        return eng.model.no_sync()  # type: ignore[operator]
    return contextlib.nullcontext()


def forward_backward(
    ctx: DistContext, cfg: Config, eng: Engine, batch: Any, sync: bool, watch: Watch | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One micro-batch: (detached loss, number of correct predictions, batch size).

    ``watch`` (the hang diagnosis's) learns whether the rank is in the forward or the backward pass.
    """
    watch = watch or Watch()
    try:
        b = batch.to(ctx.device)
        x = eng.normalizer(b.images)
        watch.at("the forward pass")
        with _no_sync(eng, sync), autocast(eng):
            logits = eng.model(x)
            loss = eng.criterion(logits.float(), b.targets)
        scaled = loss / cfg.train.accum_steps if cfg.train.accum_steps > 1 else loss
        watch.at(f"the backward pass ({eng.mode}: the gradient all-reduce)" if sync else "the backward pass")
        (eng.scaler.scale(scaled) if eng.scaler else scaled).backward()
    except torch.OutOfMemoryError as e:
        raise LaunchError(oom_message(ctx, cfg, tuple(batch.images.shape))) from e
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise LaunchError(
            f"run.deterministic = true, but this model uses an operation without a "
            f"deterministic implementation ({str(e).splitlines()[0]}); set "
            "run.deterministic = false or change the model"
        ) from e
    return loss.detach(), (logits.argmax(1) == b.targets).sum(), len(b)


def oom_message(ctx: DistContext, cfg: Config, shape: tuple[int, ...]) -> str:
    """What ran out, how much was in use at the peak, and what to try."""
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.is_cuda else 0
    total = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.is_cuda else 0
    tips = [
        f"lower data.batch_size (now {cfg.data.batch_size} per rank; train.accum_steps keeps the "
        "effective batch)"
    ]
    if cfg.train.amp == "off":
        tips.append("set train.amp = 'bf16'")
    tips.append(f"shrink data.resize/data.crop (batch shape {list(shape)})")
    return (
        f"CUDA out of memory on rank {ctx.rank} ({ctx.device}) with data.batch_size "
        f"{cfg.data.batch_size}: peak {peak / 2**30:.2f} GiB allocated by torch of "
        f"{total / 2**30:.1f} GiB. Try: " + "; ".join(tips) + "."
    )


def optimizer_step(
    ctx: DistContext, cfg: Config, eng: Engine, where: tuple[int, int], loss_sum: torch.Tensor
) -> None:
    """Unscale, stop on non-finite gradients, clip, step. ``where`` = (epoch, global step).

    No extra collective is needed for a consistent stop: under DDP the gradients are
    already averaged over ranks, so a NaN loss on any rank makes the gradient norm
    non-finite on every rank at the same step. With fp16 the GradScaler owns overflow
    (it skips the step and lowers the scale on every rank alike), so only bf16/fp32 stop.
    """
    if eng.scaler:
        eng.scaler.unscale_(eng.optimizer)
    # the optimizer's own list of the trainable parameters: walking a wrapped model's modules every
    # step cost ~0.1 ms on a busy 2-core host
    params = [p for group in eng.optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=ctx.device)
    if eng.scaler is None and not bool(torch.isfinite(norm)):
        raise_non_finite(ctx, eng, where, not bool(torch.isfinite(loss_sum)))
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.train.grad_clip, norm)
    if eng.scaler:
        eng.scaler.step(eng.optimizer)
        eng.scaler.update()
    else:
        eng.optimizer.step()
    eng.optimizer.zero_grad(set_to_none=True)
    eng.scheduler.step()


def raise_non_finite(ctx: DistContext, eng: Engine, where: tuple[int, int], local: bool) -> None:
    epoch, step = where
    blame = "this rank's loss" if local else "the gradients (another rank's loss)"
    raise LaunchError(
        f"non-finite value in {blame} at epoch {epoch} step {step + 1} on rank "
        f"{ctx.rank} (learning rate {eng.lr:.4g}); lower optim.lr, set train.grad_clip, check the data "
        "(mean/std) or use train.amp = 'bf16' instead of 'fp16'"
    )
