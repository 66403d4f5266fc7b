"""What a run reports: the step log, exact validation, metrics.csv and summary.json.

Every figure is a sum of counts reduced across ranks, so 2 ranks report exactly what
1 rank would; the step log adds nothing to a step (it reduces only at its log points).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasets.folder import write_bad_images
from distrib.config import Config
from distrib.context import DistContext
from distrib.engine.state import Hook, Run
from distrib.engine.step import Engine, autocast
from distrib.process_group import all_reduce_sum, gather_objects

log = logging.getLogger(__name__)
METRICS_COLUMNS = ["epoch", "split", "loss", "acc", "images", "seconds", "images_per_s", "lr"]


def planned_epochs(cfg: Config, steps_per_epoch: int) -> int:
    """The epochs the run will train: train.epochs, or fewer when train.max_steps ends it first."""
    if not cfg.train.max_steps:
        return cfg.train.epochs
    return min(cfg.train.epochs, math.ceil(cfg.train.max_steps / max(1, steps_per_epoch)))


class StepLog(Hook):
    """Rank 0's progress line and steps.csv, every ``train.log_every`` optimizer steps.

    The window's loss is the difference of the epoch's running sums between two log
    points, reduced across ranks only at those points.
    """

    def __init__(self, run_dir: Path, every: int, total_steps: int, epochs: int):
        """``epochs``: how many epochs the run will train (fewer than train.epochs when max_steps ends
        it first: memcheck's 300 steps are not "epoch 1/1000000")."""
        self.every, self.total, self.epochs = every, total_steps, epochs
        self.t0 = self.tw = time.perf_counter()
        self.start_step: int | None = None
        self.path = run_dir / "steps.csv"
        self.prev = [0.0, 0.0]  # global loss*n and n at the last log point of this epoch

    @staticmethod
    def _global(run: Run) -> list[float]:
        s = run.sums
        assert s is not None
        t = torch.stack([s.loss, torch.tensor(float(s.count), dtype=torch.float64, device=s.loss.device)])
        return all_reduce_sum(run.ctx, t).tolist()

    def start_epoch(self, run: Run) -> None:
        """The window begins at the epoch's current sums (non-zero when resumed mid-epoch)."""
        # every rank decides alike (the sums of a resumed epoch are rank 0's alone): one all-reduce or none
        self.prev = self._global(run) if run.sums is not None and run.prog.samples_in_epoch else [0.0, 0.0]

    def after_step(self, run: Run) -> None:
        prog = run.prog
        if self.start_step is None:
            self.start_step = prog.global_step - 1
        if prog.global_step % self.every:
            return
        now_sums = self._global(run)
        loss_n, n = now_sums[0] - self.prev[0], now_sums[1] - self.prev[1]
        self.prev = now_sums
        now = time.perf_counter()
        rate = n / max(now - self.tw, 1e-9)
        self.tw = now
        done = prog.global_step - self.start_step
        eta = (now - self.t0) / max(done, 1) * max(self.total - prog.global_step, 0)
        if run.ctx.is_main:
            self._write(run, loss_n / max(n, 1), rate, eta)

    def _write(self, run: Run, loss: float, rate: float, eta: float) -> None:
        prog, lr = run.prog, run.eng.lr
        if run.board is not None:
            run.board.scalars(
                prog.global_step, {"train/loss": loss, "train/lr": lr, "train/images_per_s": rate}
            )
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


def trim_steps(path: Path, last_step: int) -> int:
    """Drop steps.csv rows after ``last_step`` (logged before a stop, redone after the resume)."""
    if not path.exists():
        return 0
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= last_step]
    if len(keep) < len(rows):
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            csv.writer(fh).writerows(keep)
        tmp.replace(path)
    return len(rows) - len(keep)


@torch.no_grad()
def evaluate(ctx: DistContext, eng: Engine) -> dict[str, Any]:
    """Exact validation: sums over unpadded shards, reduced across ranks (None: no val set)."""
    num_classes = len(eng.feed.classes)
    eng.model.eval()
    ce = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=ctx.device)
    for batch in eng.feed.val.epoch(0):
        if len(batch) == 0:
            continue
        b = batch.to(ctx.device)
        with autocast(eng):
            logits = eng.model(eng.normalizer(b.images)).float()
        hit = logits.argmax(1) == b.targets
        n = torch.tensor(float(len(b)), dtype=torch.float64, device=ctx.device)
        totals += torch.stack([ce(logits, b.targets).double(), hit.sum().double(), n])
        per_class[0] += torch.bincount(b.targets[hit], minlength=num_classes).double()
        per_class[1] += torch.bincount(b.targets, minlength=num_classes).double()
    all_reduce_sum(ctx, totals)
    all_reduce_sum(ctx, per_class)
    loss, correct, n = totals.tolist()
    if n == 0:
        return {"loss": None, "acc": None, "images": 0, "per_class": [None] * num_classes}
    acc = (per_class[0] / per_class[1].clamp(min=1)).tolist()
    return {"loss": loss / n, "acc": correct / n, "images": int(n), "per_class": acc}


def end_of_epoch(run: Run) -> dict[str, Any]:
    """Reduce the epoch's training sums, validate, append the two metrics rows, log the line."""
    ctx, prog = run.ctx, run.prog
    run.watch.at(f"the end of epoch {prog.epoch + 1} (metric all-reduces, exact validation)")
    sums = all_reduce_sum(ctx, torch.tensor(prog.epoch_sums, dtype=torch.float64, device=ctx.device))
    loss_n, correct, n = sums.tolist()
    seconds = torch.tensor([prog.epoch_seconds], dtype=torch.float64)
    secs = all_reduce_sum(ctx, seconds).item() / ctx.world_size
    val = evaluate(ctx, run.eng)
    lr = run.eng.lr
    prog.train_seconds += secs
    prog.train_images += n
    train = {"loss": loss_n / max(n, 1), "acc": correct / max(n, 1), "images": int(n), "seconds": secs}
    train["images_per_s"] = n / max(secs, 1e-9)
    prog.rows.append({"epoch": prog.epoch, "split": "train", **train, "lr": lr})
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
    if run.board is not None and ctx.is_main:
        run.board.scalars(prog.global_step, epoch_figures(train, val))
    shown = f"val loss {val['loss']:.4f} acc {val['acc']:.4f}" if val["images"] else "no validation set"
    log.info(
        "epoch %d/%d train loss %.4f acc %.4f | %s | %.0f img/s",
        prog.epoch + 1,
        planned_epochs(run.cfg, run.eng.steps_per_epoch),
        train["loss"],
        train["acc"],
        shown,
        train["images_per_s"],
    )
    return val


def epoch_figures(train: dict[str, Any], val: dict[str, Any]) -> dict[str, float | None]:
    """An epoch's figures under TensorBoard's ``epoch/`` tags (validation's left out without a val set)."""
    seen = bool(val["images"])
    return {
        "epoch/train_loss": train["loss"],
        "epoch/train_acc": train["acc"],
        "epoch/images_per_s": train["images_per_s"],
        "epoch/val_loss": val["loss"] if seen else None,
        "epoch/val_acc": val["acc"] if seen else None,
    }


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """metrics.csv, a row per epoch and split, replaced atomically."""
    tmp = run_dir / "metrics.csv.tmp"
    with tmp.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    tmp.replace(run_dir / "metrics.csv")


def finish(run: Run, extra: dict[str, Any]) -> None:
    """summary.json (rank 0) with the final figures and ``extra`` sections; undecodable images listed."""
    every_bad = sorted({p for part in gather_objects(run.ctx, run.skipped) for p in part})
    if not run.ctx.is_main or run.run_dir is None:
        return
    write_bad_images(run.run_dir, every_bad)
    summary = summarise(run, len(every_bad)) | extra
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: val_acc %s after %d epoch(s); %s", summary["val_acc"], run.prog.epoch, run.run_dir)


def summarise(run: Run, skipped: int) -> dict[str, Any]:
    """The final figures of summary.json, from the metric rows and the progress."""
    prog, ctx = run.prog, run.ctx
    last_val = next((r for r in reversed(prog.rows) if r["split"] == "val"), None)
    last_train = next((r for r in reversed(prog.rows) if r["split"] == "train"), None)
    per_class = dict(zip(run.classes, last_val["per_class"], strict=True)) if last_val else None
    return {
        "val_acc": last_val["acc"] if last_val else None,
        "val_loss": last_val["loss"] if last_val else None,
        "val_per_class_acc": per_class,
        "best_val_acc": prog.best_acc if prog.best_acc >= 0 else None,
        "train_loss": last_train["loss"] if last_train else None,
        "train_acc": last_train["acc"] if last_train else None,
        "epochs": prog.epoch,
        "global_step": prog.global_step,
        "world_size": ctx.world_size,
        "global_batch": run.eng.global_batch,
        "per_rank_batch": run.cfg.data.batch_size,
        "accum_steps": run.cfg.train.accum_steps,
        "sample_ledger": prog.ledger,  # per epoch: samples trained, left out, repeated, missed
        "parallel_mode": run.eng.mode,
        "device": ctx.device,
        "images_per_s": prog.train_images / prog.train_seconds if prog.train_seconds else None,
        "seconds": prog.train_seconds,
        "skipped_images": skipped,
        "pid": os.getpid(),
    }
