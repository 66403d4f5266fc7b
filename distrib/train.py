"""The training engine: the epoch loop, exact metrics, checkpoints, exact resume.

One loop serves one process, DataParallel and DDP. What makes runs trustworthy:
  - data order and augmentation depend only on (seed, epoch, index) (datasets/), so a
    resumed run, a rerun, and a run at another world size see the same samples;
  - every metric is a sum of counts reduced across ranks, so 2 ranks report exactly what
    1 rank would;
  - non-finite losses or gradients stop every rank at the same step (the flag is
    all-reduced), naming the step, the rank and the learning rate;
  - checkpoints hold everything a bit-identical continuation needs (distrib/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasets.build import DataSplit, build_split
from datasets.commands import normalization, write_bad_images, write_preview
from datasets.folder import write_class_map
from datasets.loader import ImageLoader, build_loader
from datasets.transforms import Normalizer, eval_transform, train_transform
from distrib import checkpoint as ck
from distrib.config import Config
from distrib.context import DistContext
from distrib.devices import AppliedEnv
from distrib.errors import LaunchError
from distrib.models import build_model
from distrib.parallel import resolve_mode, unwrap, wrap
from distrib.process_group import all_reduce_sum, barrier, broadcast_object, gather_objects
from distrib.seeding import derive_seed, seed_process

log = logging.getLogger(__name__)
INIT, STEPS = 5, 6  # seed purposes: model initialisation (same on every rank), the loop's RNG


# --------------------------------------------------------------------------- set-up


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


@dataclass
class Engine:
    """Everything the loop touches, built once."""

    model: nn.Module  # wrapped
    bare: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    normalizer: Normalizer
    criterion: nn.Module
    train: ImageLoader
    val: ImageLoader
    mode: str
    batches_per_epoch: int
    amp_dtype: torch.dtype | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_engine(ctx: DistContext, cfg: Config, split: DataSplit, mean: tuple, std: tuple) -> Engine:
    """Loaders from the split, then the model and its optimizer (see :func:`assemble`)."""
    d = cfg.data
    common = dict(
        seed=cfg.run.seed,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        on_bad_image=d.on_bad_image,
        pad_variable=d.pad_variable,
    )
    train = build_loader(split.train, train_transform(d), ctx, train=True, sampler=d.sampler, **common)
    val = build_loader(split.val, eval_transform(d), ctx, train=False, **common)
    check_batch_fits(ctx, cfg, len(train.sampler), len(split.train))
    return assemble(ctx, cfg, len(split.classes), train, val, mean, std)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def assemble(
    ctx: DistContext, cfg: Config, num_classes: int, train: Any, val: Any, mean: tuple, std: tuple
) -> Engine:
    """Model (wrapped for the parallel mode), optimizer, schedule, AMP, normaliser.

    ``train``/``val`` are ImageLoaders, or anything with ``epoch(e)``, ``sampler`` and
    ``loader.batch_size`` (the overhead benchmark feeds in-memory batches).
    """
    t, o = cfg.train, cfg.optim
    # seeded right here: whatever ran before (stats, caches) must not change the init
    seed_process(derive_seed(cfg.run.seed, INIT))
    bare = build_model(cfg.model, num_classes).to(ctx.device)
    if cfg.data.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    mode = resolve_mode(cfg.parallel.mode, ctx)
    model = wrap(bare, ctx, mode, cfg.parallel.sync_bn)
    opt = make_optimizer(cfg, model)
    batches = len(train)
    steps_per_epoch = math.ceil(batches / t.accum_steps)
    total = max(1, steps_per_epoch * t.epochs)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, o.schedule, o.step_epochs * steps_per_epoch, o.gamma)
    )
    cuda = ctx.device.startswith("cuda")
    if t.amp != "off" and not cuda:
        log.warning("train.amp = %r needs CUDA; training in float32 on the CPU", t.amp)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp) if cuda else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    norm = Normalizer(mean, std, ctx.device, channels_last=cfg.data.channels_last, reuse=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    return Engine(
        model,
        unwrap(model),
        opt,
        sched,
        scaler,
        norm,
        criterion,
        train,
        val,
        mode,
        batches,
        amp_dtype,
        tuple(mean),
        tuple(std),
    )


def check_batch_fits(ctx: DistContext, cfg: Config, shard: int, total: int) -> None:
    if shard < cfg.data.batch_size:
        raise LaunchError(
            f"data.batch_size {cfg.data.batch_size} is larger than this rank's shard of {shard} "
            f"training images ({total} images over {ctx.world_size} rank(s)); lower data.batch_size "
            "(it is per rank) or use fewer processes"
        )


# --------------------------------------------------------------------------- state


@dataclass
class Progress:
    """The loop's position and history; saved in checkpoints, so resume is exact."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0  # optimizer steps
    best_acc: float = -1.0
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss*n, correct, n
    epoch_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: float = 0.0


def checkpoint_state(
    ctx: DistContext, cfg: Config, eng: Engine, prog: Progress, classes: tuple[str, ...]
) -> dict[str, Any] | None:
    """Collect every rank's RNG state; returns the checkpoint dict on rank 0 (None elsewhere)."""
    rngs = gather_objects(ctx, ck.rng_state())
    if not ctx.is_main:
        return None
    return {
        "model": eng.bare.state_dict(),
        "model_name": cfg.model.name,
        "classes": list(classes),
        "optimizer": eng.optimizer.state_dict(),
        "scheduler": eng.scheduler.state_dict(),
        "scaler": eng.scaler.state_dict() if eng.scaler else None,
        "progress": asdict(prog),
        "rng": rngs,
        "world_size": ctx.world_size,
        "mean": list(eng.mean),
        "std": list(eng.std),
        "config": json.dumps(asdict(cfg)),
    }


def save(
    ctx: DistContext,
    cfg: Config,
    eng: Engine,
    prog: Progress,
    mgr: ck.CheckpointManager,
    classes: tuple[str, ...],
    best: bool,
) -> None:
    state = checkpoint_state(ctx, cfg, eng, prog, classes)
    if state is not None:
        path = mgr.save(state, prog.global_step, best)
        log.info("checkpoint %s%s", path, " (best)" if best else "")
    barrier(ctx)


def resume_path(ctx: DistContext, cfg: Config, folder: Path) -> Path | None:
    """The checkpoint to resume from; for 'auto', rank 0 picks the newest valid one for all."""
    r = cfg.checkpoint.resume
    if r != "auto":
        return Path(r) if r else None
    found = None
    if ctx.is_main:
        found = ck.newest_valid(folder)
        if found is None:
            log.info(
                "checkpoint.resume = auto: no valid checkpoint in %s, starting fresh (resuming a run "
                "needs the same run.name)",
                folder,
            )
    found = broadcast_object(ctx, None if found is None else str(found))
    return Path(found) if found else None


def resume(ctx: DistContext, cfg: Config, eng: Engine, path: Path, classes: tuple[str, ...]) -> Progress:
    """Load a checkpoint into the engine and return where to continue."""
    state = ck.load_checkpoint(path)
    ck.check_compatible(state, cfg.model, classes, path)
    ck.load_model_state(eng.bare, state["model"], path)
    eng.optimizer.load_state_dict(state["optimizer"])
    eng.scheduler.load_state_dict(state["scheduler"])
    if eng.scaler and state.get("scaler"):
        eng.scaler.load_state_dict(state["scaler"])
    prog = Progress(**state["progress"])
    rngs = state["rng"]
    if len(rngs) == ctx.world_size:
        ck.set_rng_state(rngs[ctx.rank])
    else:
        log.warning(
            "checkpoint from %d rank(s), resuming on %d: RNG streams restart", len(rngs), ctx.world_size
        )
    log.info(
        "resumed from %s at epoch %d, batch %d, step %d",
        path,
        prog.epoch,
        prog.batch_in_epoch,
        prog.global_step,
    )
    return prog


# --------------------------------------------------------------------------- the loop


def _autocast(eng: Engine) -> contextlib.AbstractContextManager:
    if eng.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=eng.amp_dtype)


def _no_sync(eng: Engine, sync: bool) -> contextlib.AbstractContextManager:
    if eng.mode == "ddp" and not sync:
        return eng.model.no_sync()  # type: ignore[operator]
    return contextlib.nullcontext()


def optimizer_step(
    ctx: DistContext, cfg: Config, eng: Engine, prog: Progress, loss_sum: torch.Tensor
) -> None:
    """Unscale, stop on non-finite gradients, clip, step.

    No extra collective is needed for a consistent stop: under DDP the gradients are
    already averaged over ranks, so a NaN loss on any rank makes the gradient norm
    non-finite on every rank at the same step. With fp16 the GradScaler owns overflow
    (it skips the step and lowers the scale on every rank alike), so only bf16/fp32 stop.
    """
    if eng.scaler:
        eng.scaler.unscale_(eng.optimizer)
    params = [p for p in eng.model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=ctx.device)
    if eng.scaler is None and not bool(torch.isfinite(norm)):
        raise_non_finite(ctx, prog, eng, not bool(torch.isfinite(loss_sum)))
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.train.grad_clip, norm)
    if eng.scaler:
        eng.scaler.step(eng.optimizer)
        eng.scaler.update()
    else:
        eng.optimizer.step()
    eng.optimizer.zero_grad(set_to_none=True)
    eng.scheduler.step()
    prog.global_step += 1


def raise_non_finite(ctx: DistContext, prog: Progress, eng: Engine, local: bool) -> None:
    lr = eng.optimizer.param_groups[0]["lr"]
    where = "this rank's loss" if local else "the gradients (another rank's loss)"
    raise LaunchError(
        f"non-finite value in {where} at epoch {prog.epoch} step {prog.global_step + 1} on rank "
        f"{ctx.rank} (learning rate {lr:.4g}); lower optim.lr, set train.grad_clip, check the data "
        "(mean/std) or use train.amp = 'bf16' instead of 'fp16'"
    )


class StepLog:
    """Rank 0's progress line and steps.csv, every ``train.log_every`` optimizer steps.

    It adds nothing to a step: the window's loss is the difference of the epoch's running
    sums between two log points, reduced across ranks only at those points.
    """

    def __init__(self, ctx: DistContext, cfg: Config, run_dir: Path, eng: Engine, total_steps: int):
        self.ctx, self.every, self.total = ctx, cfg.train.log_every, total_steps
        self.epochs = cfg.train.epochs
        self.t0 = self.tw = time.perf_counter()
        self.start_step: int | None = None
        self.path = run_dir / "steps.csv"
        self.eng = eng
        self.prev = [0.0, 0.0]  # global loss*n and n at the last log point of this epoch

    def _global(self, loss_sum: torch.Tensor, count: int) -> list[float]:
        t = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)])
        return all_reduce_sum(self.ctx, t).tolist()

    def start_epoch(self, loss_sum: torch.Tensor, count: int) -> None:
        """Called when an epoch (re)starts: the window begins at the epoch's current sums."""
        self.prev = self._global(loss_sum, count) if count else [0.0, 0.0]

    def step(self, prog: Progress, loss_sum: torch.Tensor, count: int) -> None:
        if self.start_step is None:
            self.start_step = prog.global_step - 1
        if prog.global_step % self.every:
            return
        now_sums = self._global(loss_sum, count)
        w = [now_sums[0] - self.prev[0], now_sums[1] - self.prev[1]]
        self.prev = now_sums
        now = time.perf_counter()
        rate = w[1] / max(now - self.tw, 1e-9)
        self.tw = now
        done = prog.global_step - self.start_step
        eta = (now - self.t0) / max(done, 1) * max(self.total - prog.global_step, 0)
        lr = self.eng.optimizer.param_groups[0]["lr"]
        loss = w[0] / max(w[1], 1)
        if self.ctx.is_main:
            log.info(
                "epoch %d/%d step %d/%d loss %.4f lr %.4g %.0f img/s ETA %s",
                prog.epoch + 1,
                self.epochs,
                prog.global_step,
                self.total,
                loss,
                lr,
                rate,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
            new = not self.path.exists()
            with self.path.open("a", newline="") as fh:
                wr = csv.writer(fh)
                if new:
                    wr.writerow(["step", "epoch", "loss", "lr", "images_per_s"])
                wr.writerow([prog.global_step, prog.epoch, f"{loss:.8f}", f"{lr:.8g}", f"{rate:.1f}"])


def micro_batches(eng: Engine, prog: Progress, accum: int, bad: list) -> Iterator[tuple[bool, Any]]:
    """(is this the last micro-batch of an optimizer step, batch), resuming mid-epoch exactly."""
    if prog.batch_in_epoch:
        eng.train.sampler.skip_once(prog.batch_in_epoch * eng.train.loader.batch_size)  # type: ignore
    for batch in eng.train.epoch(prog.epoch):
        bad.extend(s.path for s in batch.skipped)
        i = prog.batch_in_epoch
        yield (i + 1) % accum == 0 or i + 1 == eng.batches_per_epoch, batch


def forward_backward(
    ctx: DistContext, cfg: Config, eng: Engine, batch: Any, sync: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One micro-batch: (detached loss, number of correct predictions, batch size)."""
    try:
        b = batch.to(ctx.device)
        x = eng.normalizer(b.images)
        with _no_sync(eng, sync), _autocast(eng):
            logits = eng.model(x)
            loss = eng.criterion(logits.float(), b.targets)
        scaled = loss / cfg.train.accum_steps if cfg.train.accum_steps > 1 else loss
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
    peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.startswith("cuda") else 0
    total = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.startswith("cuda") else 0
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


def train_epoch(
    ctx: DistContext,
    cfg: Config,
    eng: Engine,
    prog: Progress,
    steps: StepLog,
    mgr: ck.CheckpointManager,
    classes: tuple[str, ...],
    bad: list,
) -> bool:
    """One (possibly resumed) epoch; False when train.max_steps stopped it midway."""
    eng.model.train()
    # running sums stay on the device (no sync per step); a non-finite loss shows in loss_sum
    loss_sum, hit_sum = (torch.tensor(v, dtype=torch.float64, device=ctx.device) for v in prog.epoch_sums[:2])
    count = int(prog.epoch_sums[2])
    steps.start_epoch(loss_sum, count)
    start = time.perf_counter()
    for sync, batch in micro_batches(eng, prog, cfg.train.accum_steps, bad):
        if len(batch) == 0:
            continue
        loss, hits, n = forward_backward(ctx, cfg, eng, batch, sync)
        loss_sum.add_(loss, alpha=n)
        hit_sum.add_(hits)
        count += n
        prog.batch_in_epoch += 1
        if not sync:
            continue
        optimizer_step(ctx, cfg, eng, prog, loss_sum)
        steps.step(prog, loss_sum, count)
        every = cfg.checkpoint.every_steps
        if every and prog.global_step % every == 0 and prog.batch_in_epoch < eng.batches_per_epoch:
            prog.epoch_sums = [loss_sum.item(), hit_sum.item(), float(count)]
            prog.epoch_seconds += time.perf_counter() - start
            start = time.perf_counter()
            save(ctx, cfg, eng, prog, mgr, classes, best=False)
        if cfg.train.max_steps and prog.global_step >= cfg.train.max_steps:
            break
    prog.epoch_seconds += time.perf_counter() - start
    prog.epoch_sums = [loss_sum.item(), hit_sum.item(), float(count)]
    return prog.batch_in_epoch >= eng.batches_per_epoch


@torch.no_grad()
def evaluate(ctx: DistContext, eng: Engine, num_classes: int) -> dict[str, Any]:
    """Exact validation: sums over unpadded shards, reduced across ranks (None: no val set)."""
    eng.model.eval()
    ce = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=ctx.device)
    for batch in eng.val.epoch(0):
        if len(batch) == 0:
            continue
        b = batch.to(ctx.device)
        with _autocast(eng):
            logits = eng.model(eng.normalizer(b.images)).float()
        hit = logits.argmax(1) == b.targets
        totals += torch.stack(
            [
                ce(logits, b.targets).double(),
                hit.sum().double(),
                torch.tensor(float(len(b)), dtype=torch.float64, device=ctx.device),
            ]
        )
        per_class[0] += torch.bincount(b.targets[hit], minlength=num_classes).double()
        per_class[1] += torch.bincount(b.targets, minlength=num_classes).double()
    all_reduce_sum(ctx, totals)
    all_reduce_sum(ctx, per_class)
    loss, correct, n = totals.tolist()
    if n == 0:
        return {"loss": None, "acc": None, "images": 0, "per_class": [None] * num_classes}
    acc = (per_class[0] / per_class[1].clamp(min=1)).tolist()
    return {"loss": loss / n, "acc": correct / n, "images": int(n), "per_class": acc}


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["epoch", "split", "loss", "acc", "images", "seconds", "images_per_s", "lr"]
    tmp = run_dir / "metrics.csv.tmp"
    with tmp.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    tmp.replace(run_dir / "metrics.csv")


def end_of_epoch(
    ctx: DistContext, cfg: Config, eng: Engine, prog: Progress, classes: tuple[str, ...]
) -> dict:
    """Reduce the epoch's training sums, validate, append the two metrics rows."""
    sums = all_reduce_sum(ctx, torch.tensor(prog.epoch_sums, dtype=torch.float64, device=ctx.device))
    loss_n, correct, n = sums.tolist()
    secs = (
        all_reduce_sum(ctx, torch.tensor([prog.epoch_seconds], dtype=torch.float64)).item() / ctx.world_size
    )
    val = evaluate(ctx, eng, len(classes))
    lr = eng.optimizer.param_groups[0]["lr"]
    prog.train_seconds += secs
    prog.train_images += n
    prog.rows.append(
        {
            "epoch": prog.epoch,
            "split": "train",
            "loss": loss_n / max(n, 1),
            "acc": correct / max(n, 1),
            "images": int(n),
            "seconds": secs,
            "images_per_s": n / max(secs, 1e-9),
            "lr": lr,
        }
    )
    prog.rows.append(
        {
            "epoch": prog.epoch,
            "split": "val",
            "loss": val["loss"],
            "acc": val["acc"],
            "images": val["images"],
            "seconds": "",
            "images_per_s": "",
            "lr": lr,
            "per_class": val["per_class"],
        }
    )
    shown = f"val loss {val['loss']:.4f} acc {val['acc']:.4f}" if val["images"] else "no validation set"
    log.info(
        "epoch %d/%d train loss %.4f acc %.4f | %s | %.0f img/s",
        prog.epoch + 1,
        cfg.train.epochs,
        loss_n / max(n, 1),
        correct / max(n, 1),
        shown,
        n / max(secs, 1e-9),
    )
    return val


# --------------------------------------------------------------------------- the job


def preflight(ctx: DistContext, mgr: ck.CheckpointManager) -> None:
    """Rank 0 checks the checkpoint folder; every rank learns the verdict (no one hangs)."""
    err = None
    if ctx.is_main:
        try:
            mgr.check_writable()
        except LaunchError as e:
            err = str(e)
    err = broadcast_object(ctx, err)
    if err:
        raise LaunchError(err)


def train_job(ctx: DistContext, cfg: Config, run_dir: Path, applied: AppliedEnv) -> int:
    """``launch.py train``: the whole run, rank 0 writing the run directory."""
    set_determinism(cfg)
    split = build_split(ctx, cfg)
    mean, std = normalization(ctx, cfg, split)
    classes = split.classes
    eng = build_engine(ctx, cfg, split, mean, std)
    mgr = ck.CheckpointManager(ck.checkpoint_folder(cfg.checkpoint.dir, run_dir), cfg.checkpoint.keep_last)
    preflight(ctx, mgr)
    path = resume_path(ctx, cfg, mgr.folder)
    seed_process(derive_seed(cfg.run.seed, STEPS, ctx.rank))  # dropout etc.; a resume restores it
    prog = resume(ctx, cfg, eng, path, classes) if path else Progress()
    if ctx.is_main:
        write_class_map(classes, run_dir / "classes.json")
        if not path:
            write_preview(ctx, cfg, split, mean, std, run_dir / "preview.png")
    log.info(
        "training %s (%s) on %d image(s), validating on %d; %d class(es); %d batch(es)/epoch",
        cfg.model.name,
        eng.mode,
        len(split.train),
        len(split.val),
        len(classes),
        eng.batches_per_epoch,
    )
    total_steps = math.ceil(eng.batches_per_epoch / cfg.train.accum_steps) * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    steps = StepLog(ctx, cfg, run_dir, eng, total_steps)
    bad: list[str] = []
    val: dict[str, Any] = {}
    while prog.epoch < cfg.train.epochs:
        if not train_epoch(ctx, cfg, eng, prog, steps, mgr, classes, bad):
            save(ctx, cfg, eng, prog, mgr, classes, best=False)  # stopped by max_steps mid-epoch
            break
        val = end_of_epoch(ctx, cfg, eng, prog, classes)
        acc = val["acc"] if val["acc"] is not None else -1.0
        best = acc > prog.best_acc
        prog.best_acc = max(prog.best_acc, acc)
        prog.epoch += 1
        prog.batch_in_epoch, prog.epoch_sums, prog.epoch_seconds = 0, [0.0, 0.0, 0.0], 0.0
        if ctx.is_main:
            write_metrics(run_dir, prog.rows)
        if cfg.checkpoint.every_epoch or prog.epoch == cfg.train.epochs:
            save(ctx, cfg, eng, prog, mgr, classes, best)
        if cfg.train.max_steps and prog.global_step >= cfg.train.max_steps:
            break
    finish(ctx, cfg, run_dir, prog, val, classes, bad, eng)
    return 0


def finish(
    ctx: DistContext,
    cfg: Config,
    run_dir: Path,
    prog: Progress,
    val: dict,
    classes: tuple[str, ...],
    bad: list[str],
    eng: Engine,
) -> None:
    """summary.json (rank 0) with the final figures; bad images listed."""
    every_bad = sorted({p for part in gather_objects(ctx, bad) for p in part})
    if not ctx.is_main:
        return
    write_bad_images(run_dir, every_bad)
    last_val = next((r for r in reversed(prog.rows) if r["split"] == "val"), None)
    last_train = next((r for r in reversed(prog.rows) if r["split"] == "train"), None)
    summary = {
        "val_acc": last_val["acc"] if last_val else None,
        "val_loss": last_val["loss"] if last_val else None,
        "val_per_class_acc": dict(zip(classes, last_val["per_class"], strict=True)) if last_val else None,
        "best_val_acc": prog.best_acc if prog.best_acc >= 0 else None,
        "train_loss": last_train["loss"] if last_train else None,
        "train_acc": last_train["acc"] if last_train else None,
        "epochs": prog.epoch,
        "global_step": prog.global_step,
        "world_size": ctx.world_size,
        "parallel_mode": eng.mode,
        "device": ctx.device,
        "images_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
        "seconds": prog.train_seconds,
        "skipped_images": len(every_bad),
        "pid": os.getpid(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: val_acc %s after %d epoch(s); %s", summary["val_acc"], prog.epoch, run_dir)
