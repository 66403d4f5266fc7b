"""Atomic rank-0 checkpoints that resume exactly, loaded with ``weights_only=True``.

Why so careful: a checkpoint half-written when a node dies must never replace a good one
(temporary file, fsync, rename, fsync of the folder); a resumed run must continue the
same trajectory (model, optimizer, scheduler, scaler, every rank's RNG state, the
position inside the epoch); and loading must not execute pickled code, so everything
stored is tensors and plain Python values.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrib.config import SHAPE_KEYS, ModelSection
from distrib.errors import CheckpointWriteError, LaunchError, write_problem

log = logging.getLogger(__name__)
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
CKPT_FORMAT = 2  # 2: a digest of the contents is saved with them and verified on load


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


class _Sink:
    """What torch.save writes through: it keeps the OSError that torch's zip writer reports only
    as "[enforce fail at inline_container.cc] unexpected pos 397824 vs 397712"."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename, fsync the folder.

    Any failure (disk full, file too large, permission lost) leaves no partial file and raises
    :class:`CheckpointWriteError` naming the path, the bytes needed and free, and what to do.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sink = None
    try:
        with tmp.open("wb") as fh:
            sink = _Sink(fh)
            torch.save(obj, sink)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        cause = sink.error if sink is not None and sink.error is not None else e
        raise CheckpointWriteError(write_failure(path, payload_bytes(obj), cause)) from e
    finally:
        tmp.unlink(missing_ok=True)


def payload_bytes(obj: Any) -> int:
    """About what a checkpoint of ``obj`` takes on disk: its tensors' bytes (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def write_failure(path: Path, needed: int, error: BaseException) -> str:
    """One line: which file, why, the bytes needed and free, what survives, what to do."""
    folder = path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    reason = getattr(error, "strerror", None)
    if reason is None and 0 <= free < needed + (1 << 20):
        reason = "no space left on device"  # torch's zip writer lost the errno: the figures tell
    if reason and getattr(error, "errno", None) == errno.EFBIG:
        reason += " (a file-size limit: ulimit -f)"
    reason = reason or str(error).strip().splitlines()[0]
    earlier = [p.name for p in numbered(folder) if p != path] if folder.is_dir() else []
    kept = (
        f"the earlier ones are untouched ({', '.join(earlier[-3:])})"
        if earlier
        else "none was written before"
    )
    room = f"{_mb(free)} free" if free >= 0 else "free space unknown"
    return (
        f"could not write checkpoint {path}: {reason}; it needs about {_mb(needed)}, {room} in {folder}; "
        f"{kept}. Free space there (delete old runs, lower checkpoint.keep_last) or set checkpoint.dir "
        "to a folder with room and writable by this user, then continue with --resume auto"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def payload_digest(obj: Any) -> str:
    """sha256 over every value of a checkpoint: tensors' dtype, shape and bytes, and plain values.

    Computed from the objects, not the file, so it is the same before saving and after
    loading, and it catches what torch's zip reader does not: it skips CRC checks, so
    bytes flipped inside a tensor record load silently.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k, v in sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))):
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    else:  # str, int, float, bool, None, bytes, torch.Size ...: repr round-trips them exactly
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())


def with_digest(state: dict[str, Any]) -> dict[str, Any]:
    """The state as it is saved: the current format and the digest of everything else."""
    body = {k: v for k, v in state.items() if k != "digest"}
    body["format"] = CKPT_FORMAT
    return {**body, "digest": payload_digest(body)}


def read_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one clear line for each way a file can be bad.

    ``what`` names the file's role in messages ("checkpoint", "model.weights").
    """
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise LaunchError(
            f"{what} {path} is empty (0 bytes): its write never finished; use another checkpoint"
        )
    try:
        with warnings.catch_warnings():  # torch warns about plain pickles before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:
            raise LaunchError(
                f"{what} {path} holds pickled Python objects (it refers to {code.group(1)}), not only "
                "tensors and plain values, so it was refused: it is not a launch.py checkpoint or state "
                "dict. Re-save its tensors with torch.save(model.state_dict()) from a trusted source"
            ) from None
        why = re.search(r"Unsupported[^\n]*", text)
        raise LaunchError(
            f"{what} {path} is not a torch file or is damaged ({why.group(0) if why else _first_line(text)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
        why = _first_line(str(e)) or type(e).__name__
        raise LaunchError(
            f"{what} {path} is corrupt or truncated ({size} bytes; {why}); use another file or start fresh"
        ) from None


def _first_line(text: str) -> str:
    """torch's first sentence, without miniz's paragraph of advice."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.split(". This is an internal")[0][:160]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a launch.py checkpoint and verify its digest; every problem is one LaunchError."""
    path = Path(path)
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "format" not in ckpt:
        raise LaunchError(f"checkpoint {path} is not a launch.py checkpoint (no model/format keys)")
    verify(ckpt, path)
    return ckpt


def verify(ckpt: dict[str, Any], path: Path) -> None:
    """Check the format and the digest; format 1 (before digests) loads with a warning."""
    fmt = ckpt.get("format")
    if not isinstance(fmt, int) or fmt > CKPT_FORMAT:
        raise LaunchError(
            f"checkpoint {path} has format {fmt!r}; this launch.py reads formats up to {CKPT_FORMAT} "
            "(it was written by a newer version: update launch.py)"
        )
    if fmt < 2:
        log.warning("checkpoint %s (format %d) carries no digest: its contents cannot be verified", path, fmt)
        return
    body = {k: v for k, v in ckpt.items() if k != "digest"}
    if ckpt.get("digest") != payload_digest(body):
        raise LaunchError(
            f"checkpoint {path} fails its integrity check: its contents differ from the sha256 "
            "digest saved with them (damaged on disk or in transfer, or edited); use another checkpoint"
        )


def newest_valid(folder: Path) -> Path | None:
    """The newest ``ckpt-<step>.pt`` that loads and verifies; damaged newer ones are named and skipped."""
    for path in reversed(numbered(folder)):
        try:
            load_checkpoint(path)
        except LaunchError as e:
            log.warning("checkpoint.resume = auto: skipping %s: %s", path.name, e)
            continue
        return path
    return None


def check_compatible(ckpt: dict[str, Any], model: ModelSection, classes: tuple[str, ...], path: Path) -> None:
    """Resuming another model, architecture or class set is an error that names both sides."""
    theirs = (ckpt.get("model_name"), tuple(ckpt.get("classes", ())))
    if theirs[0] != model.name:
        raise LaunchError(
            f"checkpoint {path} holds model {theirs[0]!r}, this run builds {model.name!r}; "
            "resume with the same model.name or start fresh"
        )
    if theirs[1] != tuple(classes):
        raise LaunchError(
            f"checkpoint {path} was trained on {len(theirs[1])} classes "
            f"({', '.join(theirs[1][:5])}...), this data has {len(classes)} "
            f"({', '.join(classes[:5])}...); use the same data or start fresh"
        )
    differ = architecture_differences(ckpt, model)
    if differ:
        raise LaunchError(
            f"checkpoint {path} was trained with another architecture: {'; '.join(differ)}. "
            "Resume with the checkpoint's [model] settings or start fresh"
        )


def architecture_differences(ckpt: dict[str, Any], model: ModelSection) -> list[str]:
    """'model.width = 32 in the checkpoint, 16 now' for each shape-defining key that differs."""
    try:
        stored = json.loads(ckpt.get("config") or "{}").get("model", {})
    except (TypeError, ValueError):
        return []
    keys = SHAPE_KEYS if model.name == "small_cnn" else ("name",)
    return [
        f"model.{k} = {stored[k]!r} in the checkpoint, {getattr(model, k)!r} now"
        for k in keys
        if k in stored and stored[k] != getattr(model, k)
    ]


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``load_state_dict`` (strict), with torch's size-mismatch paragraph turned into one line."""
    own = model.state_dict()
    wrong = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if wrong or missing or extra:
        parts = (
            [f"{len(wrong)} tensor(s) of another shape (file vs model): {', '.join(wrong[:4])}"]
            if wrong
            else []
        )
        parts += [f"missing {', '.join(missing[:4])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:4])}"] if extra else []
        raise LaunchError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state)


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
        problem = write_problem(self.folder)
        if problem:
            raise LaunchError(
                f"checkpoint folder {self.folder} is not writable ({problem}); "
                "set checkpoint.dir or run.out_dir to a writable place"
            )

    def save(self, state: dict[str, Any], step: int, best: bool) -> Path:
        path = self.folder / f"ckpt-{step:08d}.pt"
        state = with_digest(state)
        save_atomic(state, path)
        if best:
            save_atomic(state, self.folder / "best.pt")
        for old in numbered(self.folder)[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path
