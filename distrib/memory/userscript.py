"""``run`` and ``memcheck``: a user's own, unchanged script (or our training job) under the monitor.

A worker started by torchrun or our elastic-agent spawn runs the script with ``runpy``
as ``__main__``, with its own ``sys.argv``; the script initialises its own process group.
Step boundaries come from torch's global optimizer-step hook, so any optimizer in any
script reports its steps without a line changed; a script without an optimizer is
sampled by time instead. The script's exit code is the job's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import runpy
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distrib.config import Config, TimingSection
from distrib.context import DistContext
from distrib.errors import LEAK_EXIT, LaunchError, LeakError
from distrib.memory.monitor import Monitor, Where
from distrib.memory.preflight import cuda_index, preflight_gpu
from distrib.memory.report import combine, leak_found, verdict_table
from distrib.signals import TermGuard, Terminated

log = logging.getLogger(__name__)
MEMCHECK_STEPS = 300  # memcheck of our own training job: steps to watch
SCRIPT, MONITOR, STOPPED = "script", "monitor", "sigterm"  # who chose a rank's exit code (agent's SIGTERM)


@dataclass(frozen=True)
class Target:
    """What to run: a script path or a module (-m), and its own arguments, untouched."""

    script: str = ""
    module: str = ""
    args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.module or self.script

    def check(self) -> None:
        if not (self.script or self.module):
            raise LaunchError("give a script to run: launch.py run [flags] SCRIPT.py [args] (or -m module)")
        if self.script and not Path(self.script).is_file():
            raise LaunchError(f"script {self.script} does not exist")
        if self.module:
            check_module(self.module)


def check_module(name: str) -> None:
    """``-m NAME`` names a module this Python finds from the current folder, as ``python -m`` would;
    one line instead of runpy's traceback on every rank."""
    import importlib.util

    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the name is not a module name
        found = False
    finally:
        sys.path.pop(0)
    if not found:
        raise LaunchError(
            f"-m {name}: no module named {name!r} on this Python's path (the current folder, then "
            f"PYTHONPATH and site-packages of {sys.executable}); check the name, or give the script's path"
        )


class ScriptStop(BaseException):  # noqa: N818 - a control-flow signal, like SystemExit
    """Raised from the optimizer-step hook to end the user's script (a BaseException, so the
    script's own ``except Exception`` cannot swallow it)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


def run_name(cfg: Config, env: dict[str, str]) -> str:
    """The run directory's name, the same on every rank without a collective."""
    if cfg.run.name:
        return cfg.run.name
    if "MASTER_PORT" in env:  # one launch: every rank sees the same rendezvous
        key = "|".join(env.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
        return f"{time.strftime('%Y%m%d')}-run-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-run-{os.getpid() % 10000:04d}"


def user_agree(ctx: DistContext) -> Any:
    """Agreement across ranks through the script's own default process group (at optimizer steps,
    where every rank is anyway); alone, or before the script made a group, a rank decides alone."""

    def agree(mine: bool) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return mine
        device = ctx.device if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if mine else 0.0], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    return agree


class StepCounter:
    """torch's global optimizer-step hook: every optimizer's step is a step boundary."""

    def __init__(self, monitor: Monitor, max_steps: int | None):
        self.monitor, self.max_steps, self.steps = monitor, max_steps, 0

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.steps += 1
        try:
            self.monitor.on_step(self.steps)
        except LeakError as e:
            raise ScriptStop(LEAK_EXIT, str(e)) from None
        if self.max_steps and self.steps >= self.max_steps:
            raise ScriptStop(0, f"memcheck: stopped after {self.steps} optimizer steps (--steps)")


def execute(target: Target) -> int:
    """Run the script as ``__main__`` with its own argv; its exit code (exceptions propagate)."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    try:  # the script's folder (-m: the current one) first, as python has it; this project's stays after
        if target.module:
            check_module(target.module)  # under torchrun, this rank is the first to look
            sys.argv = [target.module, *target.args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target.script, *target.args]
            sys.path.insert(0, str(Path(target.script).resolve().parent))
            runpy.run_path(target.script, run_name="__main__")
    except SystemExit as e:
        return exit_code(e.code)
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


def exit_code(code: object) -> int:
    """SystemExit's code as a process would exit with it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def script_job(
    ctx: DistContext,
    cfg: Config,
    run_dir: Path,
    *,
    target: Target,
    max_steps: int | None,
    term: TermGuard | None = None,
) -> int:
    """One rank: preflight, the monitor around the script, the verdict; the script's exit code.

    ``term``: the guard the worker installed when it started, holding a SIGTERM that came before
    the script could (the agent ending every rank after another failed first): the script is then
    not started, and rank 0 still writes the summary of what the other ranks measured.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from distrib.timing.script import ScriptTiming

    preflight_gpu(ctx, cfg.memory, set())
    where = Where(ctx.rank, ctx.world_size, ctx.device, cuda_index(ctx), run_dir)
    monitor = Monitor(where, cfg.memory, user_agree(ctx)).start()
    counter = StepCounter(monitor, max_steps)
    handle = register_optimizer_step_post_hook(counter)
    timing = ScriptTiming(ctx, run_dir).install() if cfg.timing.enabled else None
    if cfg.logging.tensorboard and ctx.is_main:
        log.warning("logging.tensorboard is train's: a script's figures are in timing_*.csv and memory_*")
    log.info("running %s %s under the memory monitor", target.name, " ".join(target.args))
    code, source, raised, started = 0, SCRIPT, None, False
    term = term or TermGuard().install()
    try:
        term.arm()
        started = True
        code = execute(target)
    except ScriptStop as stop:
        code, source = stop.code, MONITOR
        (log.error if stop.code else log.info)("%s", stop)
    except Terminated:
        code, source = 128 + signal.SIGTERM, STOPPED
        when = "was stopped" if started else "was not started: SIGTERM came first"
        log.warning("the script %s (the agent ends every rank when one fails)", when)
    except BaseException as e:  # the script raised or was interrupted: what was measured is still written
        code, raised = (128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1), e
    finally:
        term.armed = False
        handle.remove()
        if timing is not None:
            timing.finish()  # before the memory report: rank 0 waits for those, then reads these
        monitor.finish({"code": code, "from": source})
    if counter.steps == 0:
        log.info("the script made no optimizer step: memory was judged on %s samples", "time")
    code = conclude(ctx, run_dir, Outcome(code, source), target, term, cfg.timing if timing else None)
    if raised is not None:
        raise raised  # the script's own traceback, as python would show it
    return code


@dataclass(frozen=True)
class Outcome:
    """How a rank's job ended: its exit code, and who chose it (``source``): the script, the
    monitor (a leak with on_leak = fail, memcheck's --steps), or the agent's SIGTERM (another rank
    failed first)."""

    code: int
    source: str = SCRIPT

    def explain(self, leak_ranks: list[int]) -> str:
        """The line under the verdict table: where the exit code comes from."""
        if leak_ranks and self.code == LEAK_EXIT and self.source == MONITOR:
            return f"exit {LEAK_EXIT}: the memory detector found a leak on rank(s) {leak_ranks}"
        if self.source == STOPPED:
            return f"exit {self.code}: stopped by SIGTERM (the agent ends every rank when one fails)"
        if self.code and self.source == SCRIPT:
            found = f"found a leak on rank(s) {leak_ranks}" if leak_ranks else "found no leak"
            return f"exit {self.code}: the script's own exit code (the memory detector {found})"
        warned = f": a leak on rank(s) {leak_ranks} (memory.on_leak = warn)" if leak_ranks else ""
        return f"exit {self.code}{warned}"


def conclude(
    ctx: DistContext,
    run_dir: Path,
    outcome: Outcome,
    target: Target | None,
    term: TermGuard | None = None,
    timing: TimingSection | None = None,
) -> int:
    """Rank 0 puts the ranks side by side (summary.json, memory.png, the table) and says where the
    exit code comes from. It waits for the other ranks' reports only on a clean exit: after a
    failure, the others may be blocked in a collective this rank will never join (and a SIGTERM
    ends the wait)."""
    if not ctx.is_main:
        return outcome.code
    wait = 30.0 if outcome.code == 0 else 2.0
    stop = (lambda: term.received) if term is not None else None
    summary, reports = combine(run_dir, ctx.world_size, wait_s=wait, give_up=stop)
    ended = {str(r["rank"]): r["exit"] for r in reports if r.get("exit")}
    first = first_failure(ended)
    record = {
        "memory": summary,
        "exit_code": first["code"] if first else outcome.code,
        "exit_from": first["from"] if first else outcome.source,
        "exit_per_rank": ended,
        "leak": bool(summary["leak_ranks"]),
    }
    if target is not None:
        record["target"] = {"name": target.name, "args": list(target.args)}
    if timing is not None and (steps := script_timing(run_dir, ctx.world_size, timing)) is not None:
        record["timing"] = steps
    (run_dir / "summary.json").write_text(json.dumps(record, indent=2))
    line = Outcome(record["exit_code"], record["exit_from"]).explain(summary["leak_ranks"])
    sys.stdout.write(verdict_table(reports) + f"\nmemory files: {run_dir}\n{line}\n")
    sys.stdout.flush()
    return outcome.code


def first_failure(ended: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The exit that explains the job's: the lowest rank that failed by itself, before ranks the
    agent's SIGTERM stopped only because of it."""
    failed = [e for e in ended.values() if e["code"]]
    return next((e for e in failed if e["from"] != STOPPED), failed[0] if failed else None)


def script_timing(run_dir: Path, world: int, settings: TimingSection) -> dict[str, Any] | None:
    from distrib.timing.script import (
        judge_files,  # torch: never in the launcher, which parses run's argv here
    )

    return judge_files(run_dir, world, settings)


def memcheck_job(ctx: DistContext, cfg: Config, run_dir: Path, *, steps: int) -> int:
    """Our training job for ``steps`` steps with the detector set to fail; exit 3 on a leak."""
    from distrib.engine.train import train_job

    code = 0
    try:
        train_job(ctx, cfg, run_dir)
    except LeakError as e:
        log.error("%s", e)
        code = LEAK_EXIT
    conclude(ctx, run_dir, Outcome(code, MONITOR), None)
    return LEAK_EXIT if leak_found(run_dir) else code


def memcheck_config(cfg: Config, steps: int) -> Config:
    """The training config for memcheck: the monitor on and failing, ``steps`` steps, no checkpoints."""
    return replace(
        cfg,
        memory=replace(cfg.memory, enabled=True, on_leak="fail"),
        train=replace(cfg.train, max_steps=steps, epochs=max(cfg.train.epochs, 10**6)),
        checkpoint=replace(cfg.checkpoint, every_epoch=False, every_steps=0),
    )


def split_target(items: Sequence[str], value_flags: set[str]) -> tuple[list[str], Target]:
    """(our flags, target) from ``run``/``memcheck``'s argv: the target starts at the first
    positional, at ``-m MODULE``, or after ``--``; everything from there is the script's."""
    for i, item in enumerate(items):
        if item == "--":
            rest = items[i + 1 :]
            return list(items[:i]), Target(rest[0] if rest else "", "", tuple(rest[1:]))
        if item == "-m":
            rest = items[i + 1 :]
            return list(items[:i]), Target("", rest[0] if rest else "", tuple(rest[1:]))
        if not item.startswith("-") and (i == 0 or items[i - 1] not in value_flags):
            return list(items[:i]), Target(item, "", tuple(items[i + 1 :]))
    return list(items), Target()
