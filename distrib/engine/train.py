"""``launch.py train``: the epoch loop, checkpoints on schedule, exact resume.

One loop serves one process, DataParallel and DDP. What makes runs trustworthy:
  - data order and augmentation depend only on (seed, epoch, index) (datasets/), so a
    resumed run, a rerun, and a run at another world size see the same samples;
  - every metric is a sum of counts reduced across ranks (distrib/engine/metrics.py);
  - non-finite losses or gradients stop every rank at the same step (engine/step.py);
  - checkpoints hold everything a bit-identical continuation needs (engine/state.py).

``train_epoch(run)`` is the loop itself; benchmarks and monitors call it with their own
``Run`` (no checkpoints, their own hooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from datasets import ledger
from datasets.build import DataSplit, Sources, build_split, normalization, pixel_sources
from datasets.folder import write_class_map
from datasets.ledger import Ledger
from datasets.loader import LoaderSpec, build_loader, worker_death
from datasets.preview import write_preview
from datasets.transforms import eval_transform, train_transform
from distrib import hang, signals
from distrib.config import Config
from distrib.context import DistContext
from distrib.engine import checkpoint as ck
from distrib.engine.board import open_board, writer_class
from distrib.engine.elastic import apply, change_line, plan_batches, saved_plan
from distrib.engine.live import LiveHook, Plan, mb
from distrib.engine.metrics import StepLog, end_of_epoch, finish, planned_epochs, trim_steps, write_metrics
from distrib.engine.state import EpochSums, Hook, Run, preflight, resume, resume_path, save
from distrib.engine.step import (
    Feed,
    assemble,
    check_batch_fits,
    forward_backward,
    optimizer_step,
    set_determinism,
)
from distrib.errors import LaunchError, LeakError
from distrib.memory.monitor import Monitor, Where
from distrib.memory.preflight import cuda_index, preflight_gpu
from distrib.memory.report import combine, verdict_table
from distrib.process_group import all_reduce_sum, gather_objects, rendezvous_store
from distrib.seeding import STEPS, derive_seed, seed_process
from distrib.signals import Stopped
from distrib.timing.clock import StepClock
from distrib.timing.watch import TimingHook

log = logging.getLogger(__name__)


def build_feed(ctx: DistContext, cfg: Config, split: DataSplit) -> Feed:
    """This rank's training and validation loaders, the normalisation and the classes."""
    sources = pixel_sources(ctx, cfg, split)  # the decoded cache, filled by the stats pass or epoch 1
    mean, std = normalization(ctx, cfg, split, sources)
    train_spec, val_spec = LoaderSpec.from_config(cfg, train=True), LoaderSpec.from_config(cfg, train=False)
    if train_spec.decode_on_device and not decode_on_device_here(ctx, sources):
        train_spec = dataclasses.replace(train_spec, decode_on_device=False)
        val_spec = dataclasses.replace(val_spec, decode_on_device=False)
    check_batch_fits(ctx, cfg, len(split.train))
    train = build_loader(split.train, train_transform(cfg.data), ctx, train_spec, sources.train)
    val = build_loader(split.val, eval_transform(cfg.data), ctx, val_spec, sources.val)
    return Feed(train, val, tuple(mean), tuple(std), split.classes)


def decode_on_device_here(ctx: DistContext, sources: Sources) -> bool:
    """data.decode_on = 'cuda' where it can run; says once why not."""
    if not ctx.is_cuda:
        log.info("data.decode_on = 'cuda': this rank runs on the CPU, so images decode on the CPU")
        return False
    if sources.train is not None:
        log.info("data.decode_on = 'cuda': data.cache = 'disk' serves decoded pixels; nothing to decode")
        return False
    return True


def micro_batches(run: Run) -> Iterator[tuple[bool, Any]]:
    """(is this the last micro-batch of an optimizer step, batch), resuming mid-epoch exactly.

    The epoch resumes at ``prog.samples_in_epoch`` of its global order (a step boundary), so
    the micro-batches of a step are counted from there; the ledger counts what each delivered.
    """
    prog, train, accum = run.prog, run.eng.feed.train, run.cfg.train.accum_steps
    if prog.samples_in_epoch:
        train.sampler.start_at(prog.samples_in_epoch)
    per_micro_step = train.loader.batch_size * run.ctx.world_size  # positions all ranks consume
    run.watch.at("loading a batch")
    batches, clock = iter(train.epoch(prog.epoch)), run.clock
    for i in itertools.count():
        waited = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        if clock is not None:
            clock.add("data", time.perf_counter() - waited)
        run.skipped.extend(s.path for s in batch.skipped)
        if run.ledger is not None:
            run.ledger.add(batch.indices)
            if batch.skipped:
                run.ledger.add([s.index for s in batch.skipped])
        prog.samples_in_epoch += per_micro_step
        yield (i + 1) % accum == 0, batch
        run.watch.at("loading a batch")


def train_epoch(run: Run) -> bool:
    """One (possibly resumed) epoch; False when train.max_steps stopped it midway."""
    ctx, cfg, eng, prog, clock = run.ctx, run.cfg, run.eng, run.prog, run.clock
    eng.model.train()
    sums = run.sums = EpochSums.start(prog, ctx.device)
    for hook in run.hooks:
        hook.start_epoch(run)
    start = time.perf_counter()
    for sync, batch in micro_batches(run):
        if len(batch) == 0:
            continue
        run.watch.step = prog.global_step + 1
        began = clock.begin_forward() if clock is not None else 0.0
        loss, hits, n = forward_backward(ctx, cfg, eng, batch, sync, run.watch)
        if clock is not None:
            clock.end_backward(began, sync)
        sums.loss.add_(loss, alpha=n)
        sums.hits.add_(hits)
        sums.count += n
        if not sync:
            continue
        run.watch.at("the optimizer step")
        with clock.optimizer() if clock is not None else contextlib.nullcontext():
            optimizer_step(ctx, cfg, eng, (prog.epoch, prog.global_step), sums.loss)
        prog.global_step += 1
        run.watch.at("the step's hooks (logging, memory monitor)")
        for hook in run.hooks:
            hook.after_step(run)
        run.watch.at("the stop vote (an all-reduce started a step earlier)")
        stopping = run.vote.at_step()
        if stopping or _save_due(run):
            prog.epoch_sums = sums.as_list()
            prog.epoch_seconds += time.perf_counter() - start
            start = time.perf_counter()
            save(run, best=False)
        if clock is not None:
            clock.end_step(prog.global_step)
        if stopping:
            raise_stopped(run)
        if cfg.train.max_steps and prog.global_step >= cfg.train.max_steps:
            break
    prog.epoch_seconds += time.perf_counter() - start
    prog.epoch_sums = sums.as_list()
    return prog.samples_in_epoch >= epoch_samples(run)


def epoch_samples(run: Run) -> int:
    """The positions of the epoch's global order it trains (the tail of N mod G left out)."""
    return run.eng.steps_per_epoch * run.eng.global_batch


def _save_due(run: Run) -> bool:
    """checkpoint.every_steps fell on this step (and it is not the epoch's last: that one saves anyway)."""
    every = run.cfg.checkpoint.every_steps
    return (
        bool(every) and run.prog.global_step % every == 0 and run.prog.samples_in_epoch < epoch_samples(run)
    )


def raise_stopped(run: Run) -> None:
    assert run.stop is not None
    p = run.prog
    where = f"epoch {p.epoch + 1} step {p.global_step}"
    folder = run.ckpts.folder if run.ckpts else "nowhere (no checkpoints)"
    name = run.stop.name
    if not run.stop.received and run.stop.signum == signals.AGENT_GONE:  # agreed on another rank's news
        name = "SIGHUP (another rank's launcher is gone: a node left the job)"
    raise Stopped(
        run.stop,
        f"stopped on {name} at {where}; checkpoint written to {folder}; continue with --resume auto",
    )


def run_epochs(run: Run) -> None:
    """Epochs until train.epochs or train.max_steps; validation, metrics and checkpoints after each."""
    cfg, prog = run.cfg, run.prog
    while prog.epoch < cfg.train.epochs:
        if not train_epoch(run):
            check_ledger(run, final=False)
            save(run, best=False)  # stopped by max_steps mid-epoch
            break
        check_ledger(run, final=True)
        val = end_of_epoch(run)
        acc = val["acc"] if val["acc"] is not None else -1.0
        best = acc > prog.best_acc
        prog.best_acc = max(prog.best_acc, acc)
        prog.epoch += 1
        prog.samples_in_epoch, prog.epoch_sums, prog.epoch_seconds = 0, [0.0, 0.0, 0.0], 0.0
        if run.ledger is not None:
            run.ledger.reset()
        if run.ctx.is_main and run.run_dir is not None:
            write_metrics(run.run_dir, prog.rows)
        if cfg.checkpoint.every_epoch or prog.epoch == cfg.train.epochs:
            save(run, best)
        if cfg.train.max_steps and prog.global_step >= cfg.train.max_steps:
            break


def check_ledger(run: Run, final: bool) -> None:
    """Every rank's sample counts summed and held against the epoch's order; a mismatch stops the run.

    ``final``: the epoch ended (recorded in summary.json); else the run stops inside it
    (train.max_steps) and the positions consumed so far are checked.
    """
    if run.ledger is None:
        return
    prog = run.prog
    run.watch.at(f"the sample ledger of epoch {prog.epoch + 1} (an all-reduce)")
    counts = run.ledger.combined(run.ctx)
    order = run.eng.feed.train.sampler.order(prog.epoch)
    consumed = epoch_samples(run) if final else prog.samples_in_epoch  # what the epoch should have trained
    verdict = ledger.check(counts, order, consumed, prog.epoch)
    if not verdict.exact:
        raise ledger.violation(verdict)
    if final:
        prog.ledger.append(verdict.as_dict())


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = steps_per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def train_job(ctx: DistContext, cfg: Config, run_dir: Path) -> int:
    """``launch.py train``: the whole run, rank 0 writing the run directory.

    A dead DataLoader worker is reported in one line wherever torch notices it: its SIGCHLD
    handler raises at any point, also on the way out of a run that already failed.
    """
    try:
        return train_run(ctx, cfg, run_dir)
    except RuntimeError as e:
        died = None if isinstance(e, LaunchError) else worker_death(e, ctx.rank, cfg.data.num_workers)
        if died is None:
            raise
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # no second report on the way out
        raise died from e


def train_run(ctx: DistContext, cfg: Config, run_dir: Path) -> int:
    """The run itself: data, engine, resume, the epochs, the memory verdict, the summary."""
    stop = signals.install()  # from here on SIGTERM/SIGINT stop the run at a step boundary
    resume_from = cfg.checkpoint.resume
    if resume_from not in ("", "auto") and not Path(resume_from).is_file():  # before organize and stats
        raise LaunchError(f"checkpoint {resume_from} does not exist (checkpoint.resume / --resume)")
    if cfg.logging.tensorboard:
        writer_class()  # a missing [tb] extra is an error before any work
    set_determinism(cfg)
    mgr = ck.CheckpointManager(cfg.checkpoint.folder(run_dir), cfg.checkpoint.keep_last)
    path = resume_path(ctx, cfg, mgr.folder)
    state = ck.load_checkpoint(path) if path else None  # its global batch decides the split
    plan = plan_batches(cfg, ctx, saved_plan(state, path) if state and path else None, f"checkpoint {path}")
    cfg = apply(cfg, plan)
    split = build_split(ctx, cfg)
    feed = build_feed(ctx, cfg, split)
    run = Run(ctx, cfg, assemble(ctx, cfg, feed), ckpts=mgr, run_dir=run_dir, stop=stop)
    run.ledger = Ledger(len(split.train))
    preflight(ctx, mgr)
    seed_process(derive_seed(cfg.run.seed, STEPS, ctx.rank))  # dropout etc.; a resume restores it
    if state is not None and path is not None:
        changed = change_line(state, ctx, plan, epoch_samples(run))
        if changed:
            log.warning("%s", changed)
        resume(run, state, path)
        if ctx.is_main:
            trim_steps(run_dir / "steps.csv", run.prog.global_step)
    run.board = open_board(run_dir, ctx.rank, cfg.logging.tensorboard, run.prog.global_step)
    if ctx.is_main:
        write_class_map(feed.classes, run_dir / "classes.json")
        if not path:
            write_preview(ctx, cfg, split, feed.mean, feed.std, run_dir / "preview.png")
    steps = run.eng.steps_per_epoch
    log.info(
        "training %s (%s) on %d image(s), validating on %d; %d class(es); %s; %d step(s)/epoch",
        cfg.model.name,
        run.eng.mode,
        len(split.train),
        len(split.val),
        len(feed.classes),
        plan.describe(),
        steps,
    )
    run.hooks.append(
        StepLog(run_dir, cfg.train.log_every, total_steps(cfg, steps), planned_epochs(cfg, steps))
    )
    timing = start_timing(run)
    monitor = start_monitor(run) if cfg.memory.enabled else None
    plan = Plan(
        total_steps(cfg, steps), planned_epochs(cfg, steps), cfg.data.batch_size * cfg.train.accum_steps
    )
    live = LiveHook(ctx, run_dir, plan, timing, monitor)
    run.hooks.append(live)
    watchdog = start_watchdog(run)
    try:
        guarded_epochs(run, watchdog)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if timing is not None:
            timing.write()  # a stop or an error keeps the rows timed since the last window
        error = sys.exc_info()[1]
        memory = finish_monitor(run, monitor, together=ended_together(error))
        if run.board is not None:
            run.board.close()
        live.write(
            run, "finished" if error is None else "stopped" if isinstance(error, Stopped) else "failed"
        )
    extra = {"memory": memory} if memory else {}
    finish(run, extra | ({"timing": timing.summary()} if timing is not None else {}))
    return 0


def start_timing(run: Run) -> TimingHook | None:
    """The step breakdown on every rank (timing.enabled): the clock in the loop, the hook after it."""
    if not run.cfg.timing.enabled:
        return None
    ddp = run.ctx.distributed and run.eng.mode == "ddp"
    run.clock = StepClock(run.eng.model, comm_hooks=ddp, cuda=run.ctx.is_cuda)
    hook = TimingHook(run.ctx, run.cfg.timing, run.clock, run.run_dir, run.prog.global_step)
    run.hooks.append(hook)
    return hook


def guarded_epochs(run: Run, watchdog: hang.Watchdog | None) -> None:
    """run_epochs, with a collective that timed out turned into the hang diagnosis."""
    stop = run.stop
    try:
        if stop is not None and run.vote.now():  # asked to stop while setting up: nothing to save
            raise Stopped(stop, f"stopped on {stop.name} before the first step; nothing was trained")
        run_epochs(run)
        if stop is not None and run.vote.now():  # the vote of the last step: the run ended anyway
            log.warning("%s arrived at the last step: the run finished; nothing is left to resume", stop.name)
    except RuntimeError as e:
        if isinstance(e, LaunchError) or not run.ctx.distributed or worker_death(e, 0, 0):
            raise  # a dead DataLoader worker is train_job's to report
        if hang.is_peer_lost(e):
            raise hang.peer_lost(run.ctx, run.watch, e) from e
        if watchdog is None or not hang.is_timeout(e):
            raise
        raise hang.diagnose(watchdog, e, run.cfg.dist.timeout_s) from e


def ended_together(error: BaseException | None) -> bool:
    """Did every rank leave the loop at the same step (so each wrote its memory report)?

    A leak verdict and a stop are agreed by all ranks; any other error is this rank's alone,
    and waiting for the others' reports would hold the agent's restart up by 30 s.
    """
    return error is None or isinstance(error, (LeakError, Stopped))


def start_watchdog(run: Run) -> hang.Watchdog | None:
    """The hang watchdog of this rank (distributed runs only: one process cannot wait for another)."""
    store = rendezvous_store()
    if not run.ctx.distributed or store is None or run.run_dir is None:
        return None
    return hang.Watchdog(run.ctx, store, run.run_dir, run.watch).start()


class MemoryHook(Hook):
    """Hands every optimizer step to the memory monitor; at its checks, the readings to TensorBoard."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.leak_shown = False

    def after_step(self, run: Run) -> None:
        step = run.prog.global_step
        self.monitor.on_step(step)
        if run.board is None or step % self.monitor.settings.check_every:
            return
        rows = self.monitor.rows
        run.board.scalars(step, {f"memory/{c}_mb": mb(rows[c][-1]) for c in BOARD_MEMORY})
        found = self.monitor.finding
        if found is not None and found.verdict.leak and not self.leak_shown:
            self.leak_shown = True
            run.board.scalars(step, {"events/leak": 1})
            run.board.event("events/leak", step, found.line(run.ctx.rank, str(run.ctx.device)))


BOARD_MEMORY = ("alloc", "reserved", "host", "heap", "rss", "uss", "workers_rss", "gpu_process", "gpu_device")


def start_monitor(run: Run) -> Monitor:
    """The memory monitor around the loop (after the preflight for foreign GPU processes)."""
    ctx = run.ctx
    assert run.run_dir is not None
    ours = {int(p) for p in gather_objects(ctx, os.getpid())}
    preflight_gpu(ctx, run.cfg.memory, ours)

    def agree(mine: bool) -> bool:  # the same answer on every rank, at the same step
        flag = torch.tensor([1.0 if mine else 0.0], device=ctx.device)
        return bool(all_reduce_sum(ctx, flag).item() > 0)

    where = Where(ctx.rank, ctx.world_size, ctx.device, cuda_index(ctx), run.run_dir)
    monitor = Monitor(where, run.cfg.memory, agree).start()
    run.hooks.append(MemoryHook(monitor))
    return monitor


def finish_monitor(run: Run, monitor: Monitor | None, together: bool = True) -> dict[str, Any] | None:
    """Every rank writes its memory files; rank 0 combines them into the summary and memory.png."""
    if monitor is None:
        return None
    monitor.finish()
    if not together or not run.ctx.is_main or run.run_dir is None:
        return None
    summary, reports = combine(run.run_dir, run.ctx.world_size)
    if summary["leak_ranks"]:
        log.warning("memory verdict:\n%s", verdict_table(reports))
    return summary
