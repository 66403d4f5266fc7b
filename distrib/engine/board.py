"""TensorBoard event files (``logging.tensorboard``): one writer per rank, ``<run dir>/tensorboard/rank<N>``.

Why a folder per rank: TensorBoard draws each folder as a run, so a tag every rank writes
(``memory/*``, ``time/*``) becomes one chart with a line per rank, which is how a skew or a
straggler shows. Rank 0 alone writes the job's figures (``train/*``, ``epoch/*``) and the
straggler events; each rank writes its own leak event. Writes happen at log points, timing
windows and memory checks, never per step. A resumed run purges the events after its
checkpoint's step (they are written again), as ``steps.csv`` is trimmed.

``tensorboard`` is an optional extra: without it the key is a one-line error naming the extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distrib.errors import LaunchError

EXTRA = "pip install -e '.[tb]' (or pip install tensorboard)"


def writer_class() -> Any:
    """torch's SummaryWriter, or a LaunchError that names the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError when the tensorboard package is missing
        raise LaunchError(
            f"logging.tensorboard = true needs the tensorboard package, which is not installed: {EXTRA}; "
            "or set logging.tensorboard = false"
        ) from e
    return SummaryWriter


class Board:
    """One rank's event writer; every method is a no-op once closed."""

    def __init__(self, run_dir: Path, rank: int, resumed_step: int = 0):
        """``resumed_step``: the checkpoint's optimizer step; later events of the old run are purged."""
        self.folder = run_dir / "tensorboard" / f"rank{rank}"
        self.folder.mkdir(parents=True, exist_ok=True)
        purge = resumed_step + 1 if resumed_step else None
        self.writer: Any = writer_class()(str(self.folder), purge_step=purge, flush_secs=10)

    def scalars(self, step: int, values: dict[str, float | int | None]) -> None:
        """``tag -> value`` at ``step``; None values (not measured here) are left out."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def event(self, tag: str, step: int, text: str) -> None:
        """A text event (a straggler named, a leak found), shown in TensorBoard's Text tab."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_board(run_dir: Path | None, rank: int, enabled: bool, resumed_step: int = 0) -> Board | None:
    """The rank's board when ``logging.tensorboard`` is on (and the run has a directory)."""
    if not enabled or run_dir is None:
        return None
    return Board(run_dir, rank, resumed_step)
