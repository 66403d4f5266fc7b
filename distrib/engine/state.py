"""A training run's state, the hooks that watch it, and how it is saved and resumed.

``Run`` is the one object the loop passes around (instead of eight loose arguments);
``Progress`` is the part of it a checkpoint holds, so a resumed run continues exactly
where the saved one stopped. ``Hook`` is how step logging, benchmark timers and memory
monitors follow the loop without the loop knowing about them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets.ledger import Ledger
from distrib.config import Config
from distrib.context import DistContext
from distrib.engine import checkpoint as ck
from distrib.engine.board import Board
from distrib.engine.step import Engine
from distrib.engine.stopvote import StopVote
from distrib.errors import CheckpointWriteError, EchoedError, LaunchError
from distrib.hang import Watch
from distrib.process_group import all_reduce_sum, broadcast_object, gather_objects
from distrib.signals import StopRequest
from distrib.timing.clock import StepClock

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The loop's position and history; saved in checkpoints, so resume is exact."""

    epoch: int = 0
    samples_in_epoch: int = 0  # positions of the epoch's global order consumed (all ranks together)
    global_step: int = 0  # optimizer steps of the global batch
    best_acc: float = -1.0
    # loss*n, correct, n of the epoch so far: this rank's share while it runs, the sum over all
    # ranks in a checkpoint (a resume at any world size then reports the whole epoch exactly)
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    epoch_seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: float = 0.0
    ledger: list[dict[str, Any]] = field(default_factory=list)  # each finished epoch's ledger check


@dataclass
class EpochSums:
    """The running sums of the epoch in progress, on the device: no sync per step."""

    loss: torch.Tensor  # sum of loss * batch size (a non-finite loss shows here)
    hits: torch.Tensor  # correct predictions
    count: int = 0  # images

    @staticmethod
    def start(prog: Progress, device: str) -> EpochSums:
        loss, hits = (torch.tensor(v, dtype=torch.float64, device=device) for v in prog.epoch_sums[:2])
        return EpochSums(loss, hits, int(prog.epoch_sums[2]))

    def as_list(self) -> list[float]:
        return [self.loss.item(), self.hits.item(), float(self.count)]


class Hook:
    """Follows the loop: called when an epoch (re)starts and after every optimizer step.

    Hooks run on every rank (one may do a collective, as the step log does, when every
    rank calls it at the same step); they must not change the run's results.
    """

    def start_epoch(self, run: Run) -> None:
        """An epoch starts or resumes; ``run.sums`` holds its sums so far."""

    def after_step(self, run: Run) -> None:
        """An optimizer step finished: ``run.prog.global_step`` counts it already."""


@dataclass
class Run:
    """Everything one training run carries from step to step."""

    ctx: DistContext
    cfg: Config
    eng: Engine
    prog: Progress = field(default_factory=Progress)
    hooks: list[Hook] = field(default_factory=list)
    ckpts: ck.CheckpointManager | None = None  # None: nothing is saved (benchmarks)
    run_dir: Path | None = None
    sums: EpochSums | None = None  # the epoch in progress
    skipped: list[str] = field(default_factory=list)  # undecodable images (data.on_bad_image = skip)
    stop: StopRequest | None = None  # SIGTERM/SIGINT seen: stop at the next step boundary
    watch: Watch = field(default_factory=Watch)  # the step and operation in progress (hang diagnosis)
    ledger: Ledger | None = None  # the sample ledger of the epoch in progress (train; not benchmarks)
    clock: StepClock | None = None  # the step's phase times (timing.enabled)
    board: Board | None = None  # this rank's TensorBoard writer (logging.tensorboard)
    vote: StopVote = field(init=False)  # the stop flags of every rank, agreed a step later

    def __post_init__(self) -> None:
        self.vote = StopVote(self.ctx, self.stop)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.eng.feed.classes


# --------------------------------------------------------------------------- saving


def checkpoint_state(run: Run) -> dict[str, Any] | None:
    """Every rank's RNG state, the epoch's sums and its ledger; the dict on rank 0 (None elsewhere)."""
    rngs = gather_objects(run.ctx, ck.rng_state())
    # the epoch's running sums and sample counts, summed over the ranks: exact at any world size
    sums = all_reduce_sum(
        run.ctx, torch.tensor(run.prog.epoch_sums, dtype=torch.float64, device=run.ctx.device)
    )
    counts = run.ledger.combined(run.ctx) if run.ledger is not None else None
    if not run.ctx.is_main:
        return None
    eng = run.eng
    progress = asdict(run.prog) | {"epoch_sums": sums.tolist()}
    return {
        "model": eng.bare.state_dict(),
        "model_name": run.cfg.model.name,
        "classes": list(run.classes),
        "optimizer": eng.optimizer.state_dict(),
        "scheduler": eng.scheduler.state_dict(),
        "scaler": eng.scaler.state_dict() if eng.scaler else None,
        "progress": progress,
        "rng": rngs,
        "ledger": counts,
        "world_size": run.ctx.world_size,
        "nodes": run.ctx.nodes,
        "global_batch": eng.global_batch,
        "mean": list(eng.feed.mean),
        "std": list(eng.feed.std),
        "config": json.dumps(asdict(run.cfg)),
    }


def save(run: Run, best: bool) -> None:
    """Rank 0 writes a checkpoint of the run as it is now; every rank waits for it."""
    if run.ckpts is None:
        return
    run.watch.at("saving a checkpoint (gathering RNG states, then waiting for rank 0)")
    state = checkpoint_state(run)
    failure = None
    if state is not None:
        try:
            path = run.ckpts.save(state, run.prog.global_step, best)
            log.info("checkpoint %s%s", path, " (best)" if best else "")
        except CheckpointWriteError as e:
            failure = str(e)
    # instead of a barrier: every rank learns the outcome, so none is left waiting for rank 0
    failure = broadcast_object(run.ctx, failure)
    if failure:
        raise CheckpointWriteError(failure) if run.ctx.is_main else EchoedError(failure)


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


# --------------------------------------------------------------------------- resuming


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


def resume(run: Run, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint into the run's engine and progress: it continues where that one stopped.

    At the checkpoint's world size every rank gets its own RNG state back (bit-identical
    continuation); at another one the data order, augmentation, sums and ledger are still
    exact, but per-rank model randomness (dropout) restarts from this rank's seed.
    """
    ctx, eng = run.ctx, run.eng
    ck.check_compatible(state, run.cfg.model, run.classes, path)
    ck.load_model_state(eng.bare, state["model"], path)
    eng.optimizer.load_state_dict(state["optimizer"])
    eng.scheduler.load_state_dict(state["scheduler"])
    if eng.scaler and state.get("scaler"):
        eng.scaler.load_state_dict(state["scaler"])
    run.prog = Progress(**state["progress"])
    if not ctx.is_main:  # the epoch's sums and counts so far are global: rank 0 carries them
        run.prog.epoch_sums = [0.0, 0.0, 0.0]
    if run.ledger is not None:
        run.ledger.reset(state.get("ledger") if ctx.is_main else None)
    rngs = state["rng"]
    if len(rngs) == ctx.world_size:
        ck.set_rng_state(rngs[ctx.rank])
    else:
        log.warning(
            "checkpoint from %d rank(s), resuming on %d: data order, augmentation and metrics stay "
            "exact; per-rank model randomness (dropout) restarts from this rank's seed",
            len(rngs),
            ctx.world_size,
        )
    p = run.prog
    log.info(
        "resumed from %s at epoch %d, sample %d, step %d",
        path,
        p.epoch + 1,
        p.samples_in_epoch,
        p.global_step,
    )
