"""``launch.py bench parallel``: one device vs DataParallel vs DDP vs FSDP2, side by side.

Every mode trains the same model from the same initialisation on the same global batches
(the same inputs, split over the ranks as the training sampler would), with the same
precision, through the engine's own step (``train_epoch``). Each mode runs in its own
torchrun launch (the elastic agent, as ``train`` uses it): one process for single and
dp, one per device for ddp and fsdp. After warm-up every step is timed with the device
synchronised; the memory monitor gives each rank's peak; for ddp a second phase under
``no_sync()`` (no gradient all-reduce) gives the share of a step spent communicating.
The first losses of every mode are checked against single's.

Each launch runs distrib/bench/parallel_worker.py; this module plans the modes, runs them and
compares them (the table, bench.json, bench.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distrib.bench import parallel_worker
from distrib.bench.parallel_worker import CLASSES, Spec, _cuda_count
from distrib.bench.toolkit import REPO, markdown_table, run_checked, torchrun_cmd
from distrib.errors import LaunchError

log = logging.getLogger(__name__)
MODES = ("single", "dp", "ddp", "fsdp")


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
        parallel_worker.__file__,
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
