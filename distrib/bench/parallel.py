"""``launch.py bench parallel``: one device vs DataParallel vs DDP vs FSDP2, side by side.

Every mode trains the same model from the same initialisation on the same global batches
(the same inputs, split over the ranks as the training sampler would), with the same
precision, through the engine's own step (``train_epoch``). Each mode runs in its own
torchrun launch (the elastic agent, as ``train`` uses it): one process for single and
dp, one per device for ddp and fsdp. After warm-up every step is timed with the device
synchronised; the memory monitor gives each rank's peak; for ddp a second phase under
``no_sync()`` (no gradient all-reduce) gives the share of a step spent communicating.
The first losses of every mode are checked against single's.

Run as a script by torchrun (the repository on PYTHONPATH):
``python distrib/bench/parallel.py SPEC_JSON OUT_JSON``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distrib.bench.toolkit import REPO, markdown_table, run_checked, torchrun_cmd
from distrib.engine.state import Hook, Run
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
MODES = ("single", "dp", "ddp", "fsdp")
LOSS_STEPS = 5  # the first losses compared with single's
CLASSES = 10


@dataclass(frozen=True)
class Spec:
    """What every mode runs: model, batches, precision, steps (one JSON for every worker)."""

    mode: str
    world: int  # processes for this mode
    devices: int  # devices the global batch is spread over (dp: GPUs in one process)
    model: str
    global_batch: int  # the same for every mode: batch per device x the devices of the widest mode
    image_size: int
    steps: int
    warmup: int
    amp: str
    seed: int = 0
    run_dir: str = ""
    config: str = ""  # a training config whose data to use instead of synthetic batches


# --------------------------------------------------------------------------- in the worker


class GlobalBatches:
    """The same global batches for every mode; each rank takes its stride, as the sampler does."""

    def __init__(self, spec: Spec, rank: int, world: int):
        import torch

        self.spec, self.rank, self.world = spec, rank, world
        g = torch.Generator().manual_seed(spec.seed)
        n, s = spec.global_batch, spec.image_size
        pool = 4  # distinct global batches, cycled
        self.images = torch.randint(0, 256, (pool, n, 3, s, s), dtype=torch.uint8, generator=g)
        self.targets = torch.randint(0, CLASSES, (pool, n), generator=g)
        self.index = torch.arange(n)
        self.sampler = _NoSkip()
        self.loader = _Batching(n // world)
        self.steps = spec.warmup + spec.steps
        self.waits: list[float] = []  # seconds the loop waited for each batch

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[Any]:
        from datasets.collate import Batch

        for k in range(self.steps):
            start = time.perf_counter()
            idx = slice(self.rank, None, self.world)
            batch = Batch(self.images[k % 4][idx], self.targets[k % 4][idx], self.index[idx])
            self.waits.append(time.perf_counter() - start)
            yield batch


class _NoSkip:
    def skip_once(self, items: int) -> None:
        """In-memory batches are never resumed mid-epoch."""


@dataclass(frozen=True)
class _Batching:
    batch_size: int


class StepRecorder(Hook):
    """Per optimizer step: seconds (device synchronised) and this rank's loss sum and count."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: list[float] = []
        self.losses: list[tuple[float, int]] = []
        self.mark = 0.0
        self.prev = (0.0, 0)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start_epoch(self, run: Run) -> None:
        self.mark, self.prev = self._now(), (0.0, 0)

    def after_step(self, run: Run) -> None:
        now = self._now()
        self.seconds.append(now - self.mark)
        self.mark = now
        assert run.sums is not None
        total, count = run.sums.loss.item(), run.sums.count
        self.losses.append((total - self.prev[0], count - self.prev[1]))
        self.prev = (total, count)


def engine_for(ctx: Any, spec: Spec, feed_train: Any) -> Any:
    """The engine ``train`` would build for this mode (the same init on every rank and mode)."""
    from distrib.config import load_config
    from distrib.engine.step import Feed, assemble

    sets = [f"model.name={spec.model}", "optim.lr=0.01", "optim.schedule=constant", f"train.amp={spec.amp}",
            f"run.seed={spec.seed}", "model.batchnorm=false", "model.width=32"]  # fmt: skip
    cfg = load_config(None, sets)
    mode = "none" if spec.mode == "single" else spec.mode
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode=mode))
    feed = Feed(
        feed_train, feed_train, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(str(c) for c in range(CLASSES))
    )
    return cfg, assemble(ctx, cfg, feed)


def epochs(run: Run, recorder: StepRecorder, steps: int) -> None:
    """Train from step 0 until ``steps`` steps were recorded (real data may need several epochs)."""
    from distrib.engine.state import Progress
    from distrib.engine.train import train_epoch

    run.prog = Progress()
    recorder.seconds, recorder.losses = [], []
    while len(recorder.seconds) < steps:
        train_epoch(run)
        run.prog.epoch += 1
        run.prog.batch_in_epoch, run.prog.epoch_sums = 0, [0.0, 0.0, 0.0]


def measure(run: Run, recorder: StepRecorder, spec: Spec, batches: Any) -> dict[str, Any]:
    """The timed steps (warm-up dropped) and, for ddp, the same steps without all-reduce."""
    total = spec.warmup + spec.steps
    epochs(run, recorder, total)
    out = {"seconds": recorder.seconds[spec.warmup :], "losses": recorder.losses[:LOSS_STEPS]}
    out["data_wait"] = sum(batches.waits[spec.warmup : total])
    if spec.mode == "ddp":
        with run.eng.model.no_sync():  # the same steps, gradients never averaged: no communication
            epochs(run, recorder, total)
        out["seconds_no_sync"] = recorder.seconds[spec.warmup :]
    return out


class TimedLoader:
    """A training loader whose waits for the next batch are counted (the data-wait share)."""

    def __init__(self, inner: Any):
        self.inner, self.sampler, self.loader = inner, inner.sampler, inner.loader
        self.waits: list[float] = []

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int) -> Iterator[Any]:
        it = iter(self.inner.epoch(epoch))
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def config_engine(ctx: Any, spec: Spec) -> tuple[Any, Any, TimedLoader]:
    """The engine on a training config's own data, batches split as the global batch requires."""
    from datasets.build import build_split
    from distrib.config import load_config
    from distrib.engine.step import assemble
    from distrib.engine.train import build_feed

    mode = "none" if spec.mode == "single" else spec.mode
    sets = [
        f"data.batch_size={spec.global_batch // spec.world}",
        f"train.amp={spec.amp}",
        f"train.max_steps={spec.warmup + spec.steps}",
        "train.epochs=1000000",
    ]
    cfg = load_config(spec.config, sets)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode=mode))  # fsdp: bench only
    feed = build_feed(ctx, cfg, build_split(ctx, cfg))
    timed = TimedLoader(feed.train)
    feed = dataclasses.replace(feed, train=timed)
    return cfg, assemble(ctx, cfg, feed), timed


class HandLoop(Hook):
    """What a person writes to time one device (the same init and batches, no engine), one of its
    steps run right after each engine step, so both see the same machine load."""

    def __init__(self, ctx: Any, spec: Spec, batches: GlobalBatches, recorder: StepRecorder):
        import torch

        from distrib.engine.models import SmallCNN
        from distrib.seeding import INIT, derive_seed, seed_process

        with torch.random.fork_rng(devices=[]):
            seed_process(derive_seed(spec.seed, INIT))
            self.model = SmallCNN(CLASSES, 32, False).to(ctx.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.mean = torch.tensor([0.5] * 3, device=ctx.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.25] * 3, device=ctx.device).view(1, 3, 1, 1) * 255
        self.ctx, self.batches, self.recorder = ctx, batches, recorder
        self.seconds: list[float] = []

    def after_step(self, run: Run) -> None:
        import torch
        from torch import nn

        k = run.prog.batch_in_epoch - 1
        start = time.perf_counter()
        x = (self.batches.images[k % 4].to(self.ctx.device).float() - self.mean) / self.std
        loss = nn.functional.cross_entropy(self.model(x), self.batches.targets[k % 4].to(self.ctx.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ctx.is_cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        self.recorder.mark = time.perf_counter()  # the engine's next step starts now


def worker(spec_path: str, out_path: str) -> int:
    """One mode on this rank: engine, monitor, timed steps; rank 0 writes every rank's results."""
    from distrib.context import DistContext
    from distrib.engine.train import MemoryHook
    from distrib.memory.monitor import Monitor, Where
    from distrib.memory.preflight import cuda_index
    from distrib.process_group import barrier, gather_objects, process_group

    spec = Spec(**json.loads(Path(spec_path).read_text()))
    ctx = DistContext.from_env(os.environ, cuda_device_count=_cuda_count())
    with process_group(ctx, 300):
        if spec.config:
            cfg, eng, batches = config_engine(ctx, spec)
        else:
            batches = GlobalBatches(spec, ctx.rank, ctx.world_size)
            cfg, eng = engine_for(ctx, spec, batches)
        recorder = StepRecorder(ctx.is_cuda)
        where = Where(ctx.rank, ctx.world_size, ctx.device, cuda_index(ctx), Path(spec.run_dir))
        monitor = Monitor(where, cfg.memory, agree=lambda mine: mine).start()
        hand = HandLoop(ctx, spec, batches, recorder) if spec.mode == "single" and not spec.config else None
        run = Run(ctx, cfg, eng, hooks=[recorder, MemoryHook(monitor), *([hand] if hand else [])])
        result = measure(run, recorder, spec, batches)
        if hand is not None:
            result["hand_seconds"] = hand.seconds[spec.warmup :]
        monitor.finish()
        result["memory"] = monitor.report()["peak"] | {"device": ctx.device}
        every = gather_objects(ctx, result)
        # FSDP2 on gloo: destroying the group while its modules and hooks are alive aborts one rank
        # now and then ("terminate called without an active exception"); release them everywhere first
        del run, eng, hand, monitor, recorder
        gc.collect()
        barrier(ctx)
    if ctx.is_main:
        Path(out_path).write_text(json.dumps(every))
    return 0


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- in the launcher


def availability(mode: str, gpus: int, nproc: int) -> str | None:
    """Why ``mode`` cannot run with these devices (None: it can)."""
    if mode == "dp" and gpus == 0:
        return (
            "not available here: DataParallel replicates a module over CUDA devices inside one process; "
            "on the CPU it is a plain module call, which would only time `single` again"
        )
    if mode in ("ddp", "fsdp") and nproc < 2 and gpus == 0:
        return f"not available with {nproc} process: {mode} on the CPU needs --nproc-per-node >= 2"
    if mode in ("ddp", "fsdp") and gpus and nproc > gpus:
        return f"cannot run: {nproc} processes but {gpus} GPU(s) visible; {mode} uses one GPU per process"
    return None


def run_mode(spec: Spec, scratch: Path) -> list[dict[str, Any]]:
    """One torchrun launch of ``spec.world`` processes for this mode; every rank's results."""
    spec_path, out = scratch / f"{spec.mode}.spec.json", scratch / f"{spec.mode}.out.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not spec.devices or spec.mode in ("single",) and not visible_gpus():
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
    cmd = [
        *torchrun_cmd(),
        "--standalone",
        "--nproc_per_node",
        str(spec.world),
        __file__,
        str(spec_path),
        str(out),
    ]
    run_checked(cmd, env, timeout=1800)
    return json.loads(out.read_text())


def visible_gpus() -> int:
    return _cuda_count()


def summarise_mode(spec: Spec, ranks: list[dict[str, Any]], single: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the table from every rank's figures (rank 0's clock for the step times)."""
    secs = ranks[0]["seconds"]
    step = statistics.median(secs)
    row: dict[str, Any] = {
        "_seconds": secs,
        "mode": spec.mode,
        "processes": spec.world,
        "devices": spec.devices,
        "global_batch": spec.global_batch,
        "median_step_s": step,
        "p95_step_s": sorted(secs)[min(len(secs) - 1, int(0.95 * len(secs)))],
        "images_per_s": spec.global_batch / step,
        "data_wait_share": ranks[0]["data_wait"] / sum(secs),
    }
    peaks = [
        r["memory"].get("reserved") or r["memory"].get("heap") or r["memory"].get("rss") or 0 for r in ranks
    ]
    row["peak_mem_per_device_mib"] = [round(p / 2**20, 1) for p in peaks]
    nvml = [r["memory"].get("gpu_process") for r in ranks]
    row["peak_nvml_per_device_mib"] = [round(p / 2**20, 1) if p else None for p in nvml]  # None: no NVML
    row["mem_skew"] = max(peaks) / min(peaks) if min(peaks) > 0 else None
    if "seconds_no_sync" in ranks[0]:
        row["comm_share"] = max(0.0, 1 - statistics.median(ranks[0]["seconds_no_sync"]) / step)
    losses = global_losses(ranks)
    row["losses"] = losses
    if single is not None:
        row["scaling_efficiency"] = row["images_per_s"] / (single["images_per_s"] * spec.devices)
        row["loss_max_rel_diff"] = max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, single["losses"], strict=False)
        )
    if "hand_seconds" in ranks[0]:
        row["vs_hand_loop"] = step / statistics.median(ranks[0]["hand_seconds"])
    return row


def global_losses(ranks: list[dict[str, Any]]) -> list[float]:
    """The mean loss over the global batch at each of the first steps (sums over ranks)."""
    out = []
    for k in range(min(len(r["losses"]) for r in ranks)):
        total = sum(r["losses"][k][0] for r in ranks)
        count = sum(r["losses"][k][1] for r in ranks)
        out.append(total / max(count, 1))
    return out


LOSS_TOL = {"off": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


def check_losses(rows: list[dict[str, Any]], amp: str) -> None:
    """Each mode's first global losses against single's, within the precision's tolerance: a
    parallel mode that trains something else is marked (row["loss_ok"] = False, "NO" in the table)
    and named in the log."""
    for row in rows:
        ok = row["mode"] == "single" or row.get("loss_max_rel_diff", math.inf) <= LOSS_TOL[amp]
        row["loss_ok"] = ok
        if not ok:
            log.warning(
                "bench parallel: %s's losses differ from single's by %.3g (relative) > %.0e (%s): it does "
                "not train the same model on the same batches",
                row["mode"], row.get("loss_max_rel_diff", math.inf), LOSS_TOL[amp], amp,
            )  # fmt: skip


def plan_specs(
    modes: list[str], gpus: int, nproc: int, common: dict[str, Any]
) -> tuple[list[Spec], dict[str, str]]:
    """The specs of the modes that can run here, single first (the baseline), and why the others cannot."""
    wanted = ["single"] + [m for m in modes if m != "single"]
    width = max(gpus if "dp" in modes and gpus else 1, nproc if {"ddp", "fsdp"} & set(modes) else 1)
    reasons: dict[str, str] = {}
    specs = []
    for mode in wanted:
        why = availability(mode, gpus, nproc)
        if why:
            reasons[mode] = why
            continue
        world = nproc if mode in ("ddp", "fsdp") else 1
        devices = {"single": 1, "dp": gpus}.get(mode, nproc)
        specs.append(Spec(mode, world, devices, global_batch=common["batch"] * width, **common["rest"]))
    return specs, reasons


def main(out: Path, modes: list[str], nproc: int | None, options: dict[str, Any]) -> int:
    """``launch.py bench parallel``: every mode that can run here, the table, the files."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise LaunchError(f"--modes {','.join(unknown)}: choose from {', '.join(MODES)}")
    if not options["config"]:
        check_image_size(options["model"], options["image_size"])
    gpus = visible_gpus()
    nproc = nproc or gpus or 2  # one process per GPU (one GPU: every code path, no scaling), else 2 CPU ranks
    rest = {k: options[k] for k in ("model", "image_size", "steps", "warmup", "amp", "config")}
    out.mkdir(parents=True, exist_ok=True)
    specs, reasons = plan_specs(
        modes, gpus, nproc, {"batch": options["batch"], "rest": rest | {"run_dir": ""}}
    )
    rows: list[dict[str, Any]] = []
    single = None
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            spec = dataclasses.replace(spec, run_dir=str(out / f"memory-{spec.mode}"))
            log.info("bench parallel: %s on %d device(s), %d process(es), global batch %d ...",
                     spec.mode, spec.devices, spec.world, spec.global_batch)  # fmt: skip
            row = summarise_mode(spec, run_mode(spec, Path(tmp)), single)
            single = single or row
            rows.append(row)
            log.info("bench parallel: %s %.1f images/s, median step %.4f s", spec.mode, row["images_per_s"],
                     row["median_step_s"])  # fmt: skip
    check_losses(rows, options["amp"])
    write(
        out,
        rows,
        reasons,
        {"modes": modes, "nproc": nproc, "gpus": gpus, **options, "loss_tolerance": LOSS_TOL[options["amp"]]},
    )
    for mode, why in reasons.items():
        log.info("bench parallel: %s %s", mode, why)
    sys.stdout.write(table(rows, reasons) + f"\nresults in {out}\n")
    return 0


def check_image_size(model_name: str, size: int) -> None:
    """Refuse an image side the model cannot take, naming the smallest it can, before any worker."""
    from distrib.config import load_config
    from distrib.engine.models import accepts, build_model, smallest_input

    cfg = load_config(None, [f"model.name={model_name}", "model.batchnorm=false", "model.width=32"])
    model = build_model(cfg.model, CLASSES)
    if accepts(model, size):
        return
    least = smallest_input(model)
    fix = f"use --image-size {least} or more" if least else "no size up to 4096 px works: check the model"
    raise LaunchError(f"--image-size {size}: {model_name} cannot take {size} x {size} px images; {fix}")


def table(rows: list[dict[str, Any]], reasons: dict[str, str]) -> str:
    show = []
    for r in rows:
        show.append({
            "mode": r["mode"], "devices": r["devices"], "images/s": round(r["images_per_s"], 1),
            "median step s": round(r["median_step_s"], 4), "p95 step s": round(r["p95_step_s"], 4),
            "scaling eff.": round(r.get("scaling_efficiency", 1.0), 3),
            "data wait": f"{100 * r['data_wait_share']:.1f}%",
            "comm share": f"{100 * r['comm_share']:.0f}%" if "comm_share" in r else "-",
            "peak MiB per device": "/".join(f"{p:.0f}" for p in r["peak_mem_per_device_mib"]),
            "losses match single": "yes" if r["loss_ok"] else "NO",
        })  # fmt: skip
    text = markdown_table(show) if show else ""
    return text + "".join(f"\n{m}: {why}" for m, why in reasons.items())


def write(out: Path, rows: list[dict[str, Any]], reasons: dict[str, str], meta: dict[str, Any]) -> None:
    """bench.csv (every timed step), bench.json, bench.md, bench.png."""
    import csv

    with (out / "bench.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "step", "seconds"])
        for r in rows:
            w.writerows([r["mode"], i, f"{t:.6f}"] for i, t in enumerate(r.pop("_seconds", [])))
    modes = {r["mode"]: r for r in rows} | {
        m: {"mode": m, "available": False, "reason": why} for m, why in reasons.items()
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "modes": modes}, indent=2))
    (out / "bench.md").write_text(table(rows, reasons) + "\n")
    plot(out / "bench.png", rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Images/s per mode, and peak memory per device for each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, mem) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in rows]
    tput.bar(names, [r["images_per_s"] for r in rows], color="#4c72b0")
    tput.set_ylabel("images/s")
    tput.set_title("throughput")
    width = 0.8 / max(max(len(r["peak_mem_per_device_mib"]) for r in rows), 1)
    labelled: set[int] = set()
    for i, r in enumerate(rows):
        for d, peak in enumerate(r["peak_mem_per_device_mib"]):
            mem.bar(i + d * width, peak, width, color=f"C{d}", label=None if d in labelled else f"device {d}")
            labelled.add(d)
    mem.set_xticks(
        [i + width * (len(r["peak_mem_per_device_mib"]) - 1) / 2 for i, r in enumerate(rows)], names
    )
    mem.set_ylabel("peak MiB (torch reserved on CUDA; glibc heap on CPU)")
    mem.set_title("peak memory per device")
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
