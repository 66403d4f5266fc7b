"""``launch.py eval --checkpoint PATH [--data DIR]``: accuracy, per-class accuracy,
confusion matrix and predictions of a checkpoint, on 1 or N ranks with identical results.

Every rank evaluates an unpadded shard; rank 0 gathers (index, prediction) pairs and
computes every figure from the complete, index-ordered list, so the world size cannot
change a number.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.build import build_split
from datasets.folder import Samples, scan_imagefolder
from datasets.loader import LoaderSpec, build_loader
from datasets.transforms import Normalizer, eval_transform
from distrib.config import Config, config_from_dict
from distrib.context import DistContext
from distrib.engine.checkpoint import load_checkpoint, load_model_state
from distrib.engine.models import build_model
from distrib.errors import LaunchError
from distrib.process_group import gather_objects

log = logging.getLogger(__name__)


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The training run's config, as stored in the checkpoint."""
    raw = json.loads(state["config"])
    raw["model"]["weights"] = ""  # the checkpoint itself provides the weights
    return config_from_dict(raw)


def eval_samples(ctx: DistContext, cfg: Config, classes: tuple[str, ...], data_dir: str | None) -> Samples:
    """--data (an ImageFolder with the same classes) or the run's validation split."""
    if not data_dir:
        return build_split(ctx, cfg).val
    samples = scan_imagefolder(data_dir)
    if samples.classes != classes:
        raise LaunchError(
            f"--data {data_dir} has classes {list(samples.classes)[:6]}, the checkpoint was trained on "
            f"{list(classes)[:6]}; evaluate on data with the same class folders"
        )
    return samples


@torch.no_grad()
def predict(
    ctx: DistContext, cfg: Config, state: dict[str, Any], samples: Samples, path: Path
) -> list[tuple]:
    """(index, prediction, confidence) for this rank's shard (``path``: the checkpoint, for errors)."""
    classes = tuple(state["classes"])
    model = build_model(cfg.model, len(classes))
    load_model_state(model, state["model"], path)
    model.to(ctx.device).eval()
    norm = Normalizer(state["mean"], state["std"], ctx.device)
    spec = dataclasses.replace(
        LoaderSpec.from_config(cfg, train=False), on_bad_image="error"
    )  # count every image
    loader = build_loader(samples, eval_transform(cfg.data), ctx, spec)
    out: list[tuple] = []
    for batch in loader.epoch(0):
        if len(batch) == 0:
            continue
        probs = torch.softmax(model(norm(batch.images.to(ctx.device))).float(), dim=1)
        conf, pred = probs.max(dim=1)
        out += zip(batch.indices.tolist(), pred.tolist(), conf.tolist(), strict=True)
    return out


def report(samples: Samples, classes: tuple[str, ...], rows: list[tuple]) -> dict[str, Any]:
    """Accuracy, per-class accuracy and the confusion matrix from every prediction."""
    idx = np.array([r[0] for r in rows], dtype=np.int64)
    pred = np.array([r[1] for r in rows], dtype=np.int64)
    target = samples.targets[idx]
    c = len(classes)
    confusion = np.bincount(target * c + pred, minlength=c * c).reshape(c, c)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "accuracy": float((pred == target).mean()) if len(idx) else None,
        "images": int(len(idx)),
        "per_class_acc": dict(zip(classes, per_class.tolist(), strict=True)),
        "confusion": confusion,
    }


def write_outputs(
    run_dir: Path, samples: Samples, classes: tuple[str, ...], rows: list[tuple], rep: dict
) -> None:
    with (run_dir / "confusion.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["target\\pred", *classes])
        for name, counts in zip(classes, rep["confusion"].tolist(), strict=True):
            w.writerow([name, *counts])
    with (run_dir / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "target", "prediction", "confidence"])
        for i, p, conf in rows:
            w.writerow([samples.paths[i], classes[samples.targets[i]], classes[p], f"{conf:.6f}"])
    data = {k: v for k, v in rep.items() if k != "confusion"}
    (run_dir / "eval.json").write_text(json.dumps(data, indent=2))


def eval_job(
    ctx: DistContext,
    cfg: Config,
    run_dir: Path,
    *,
    checkpoint: str,
    data_dir: str | None,
) -> int:
    """Evaluate ``checkpoint``; rank 0 prints the accuracy and writes the CSVs."""
    state = load_checkpoint(checkpoint)
    ckcfg = checkpoint_config(state)
    classes = tuple(state["classes"])
    samples = eval_samples(ctx, ckcfg, classes, data_dir)
    rows = sorted(
        r for part in gather_objects(ctx, predict(ctx, ckcfg, state, samples, Path(checkpoint))) for r in part
    )
    if ctx.is_main:
        rep = report(samples, classes, rows)
        write_outputs(run_dir, samples, classes, rows, rep)
        sys.stdout.write(
            f"accuracy {rep['accuracy']:.6f} on {rep['images']} image(s); per class: "
            + ", ".join(f"{k} {v:.4f}" for k, v in rep["per_class_acc"].items())
            + f"\nwritten: {run_dir}/eval.json, confusion.csv, predictions.csv\n"
        )
    return 0
