"""Atomic rank-0 checkpoints that resume exactly, loaded with ``weights_only=True``.

Why so careful: a checkpoint half-written when a node dies must never replace a good one
(temporary file, fsync, rename, fsync of the folder); a resumed run must continue the
same trajectory (model, optimizer, scheduler, scaler, every rank's RNG state, the
position inside the epoch); and loading must not execute pickled code, so everything
stored is tensors and plain Python values.
"""

from __future__ import annotations

import logging
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.errors import LaunchError

log = logging.getLogger(__name__)
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; a corrupt or truncated file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise LaunchError(
            f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); "
            "resume from another one (see its folder) or start fresh"
        ) from e
    except Exception as e:  # weights_only refuses arbitrary pickles: not one of ours
        raise LaunchError(f"checkpoint {path} is not a launch.py checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format" not in ckpt:
        raise LaunchError(f"checkpoint {path} is not a launch.py checkpoint (no model/format keys)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], model_name: str, classes: tuple[str, ...], path: Path) -> None:
    """Resuming another model or class set is an error that names both."""
    theirs = (ckpt.get("model_name"), tuple(ckpt.get("classes", ())))
    if theirs[0] != model_name:
        raise LaunchError(
            f"checkpoint {path} holds model {theirs[0]!r}, this run builds {model_name!r}; "
            "resume with the same model.name or start fresh"
        )
    if theirs[1] != tuple(classes):
        raise LaunchError(
            f"checkpoint {path} was trained on {len(theirs[1])} classes "
            f"({', '.join(theirs[1][:5])}...), this data has {len(classes)} "
            f"({', '.join(classes[:5])}...); use the same data or start fresh"
        )


def numbered(folder: Path) -> list[Path]:
    """``ckpt-<step>.pt`` files in ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    steps = {p: NAME.match(p.name) for p in folder.iterdir()}
    return sorted((p for p, m in steps.items() if m), key=lambda p: int(NAME.match(p.name).group(1)))


def latest(folder: Path) -> Path | None:
    """The newest ``ckpt-<step>.pt`` in ``folder`` (by step), if any."""
    found = numbered(folder)
    return found[-1] if found else None


class CheckpointManager:
    """Rank 0 writes ``ckpt-<global step>.pt``, keeps the last K and ``best.pt``."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = folder
        self.keep_last = keep_last

    def check_writable(self) -> None:
        """Fail before training, not after the first epoch."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise LaunchError(
                f"checkpoint folder {self.folder} is not writable ({e.strerror}); "
                "set checkpoint.dir or run.out_dir to a writable place"
            ) from e

    def save(self, state: dict[str, Any], step: int, best: bool) -> Path:
        path = self.folder / f"ckpt-{step:08d}.pt"
        save_atomic(state, path)
        if best:
            save_atomic(state, self.folder / "best.pt")
        for old in numbered(self.folder)[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path
