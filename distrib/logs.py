"""Rank-aware logging: one ``[rank N]`` prefix, rank 0 shown unless asked for more.

Why not patch ``print``: a prefix on every line and a per-rank level keep N ranks'
output readable without hiding warnings from the other ranks, and nothing here does a
collective, so logging can never hang a job.
"""

from __future__ import annotations

import logging
import sys

from distrib.errors import LaunchError


def parse_log_ranks(spec: str) -> frozenset[int] | None:
    """'0' -> {0}; '0,3' -> {0, 3}; 'all' -> None (every rank)."""
    text = spec.strip().lower()
    if text == "all":
        return None
    try:
        ranks = frozenset(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise LaunchError(f"--log-ranks {spec!r}: give 0, all, or a list like 0,3") from None
    if not ranks or min(ranks) < 0:
        raise LaunchError(f"--log-ranks {spec!r}: give 0, all, or a list like 0,3")
    return ranks


def check_log_ranks(spec: str, world_size: int) -> None:
    """Every rank named in ``spec`` must exist: a wrong list would silently show nothing."""
    shown = parse_log_ranks(spec)
    absent = sorted(r for r in shown or () if r >= world_size)
    if absent:
        raise LaunchError(
            f"launch.log_ranks / --log-ranks {spec!r}: rank {', '.join(map(str, absent))} does not exist "
            f"in this job of {world_size} rank(s) (0-{world_size - 1}); name existing ranks or 'all'"
        )


class _RankHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we own, so reconfiguring never removes anyone else's."""


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{self.prefix} {record.levelname}: {msg}"
        return f"{self.prefix} {msg}"


def setup_logging(rank: int | None, log_ranks: str = "0") -> None:
    """Configure the root logger for this process.

    Args:
        rank: global rank, or None in the launcher parent (prefix ``[launcher]``).
        log_ranks: which ranks show INFO; the others show warnings and errors only.
    """
    shown = parse_log_ranks(log_ranks)
    prefix = "[launcher]" if rank is None else f"[rank {rank}]"
    visible = rank is None or shown is None or rank in shown
    handler = _RankHandler(sys.stderr)
    handler.setFormatter(_PrefixFormatter(prefix))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RankHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if visible else logging.WARNING)
