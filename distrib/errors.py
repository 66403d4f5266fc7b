"""User-facing errors: they carry a message that names the value and the fix.

``launch.py`` prints these without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

LEAK_EXIT = 3  # a worker's exit status when the memory detector found a leak (memcheck, on_leak = fail)


def first_line(e: BaseException) -> str:
    """An exception's first line (torch's errors run on for paragraphs), or its type's name."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class LaunchError(RuntimeError):
    """Bad input or environment, reported as a one-paragraph message."""


class CheckpointWriteError(LaunchError):
    """A checkpoint could not be written (disk full, permission lost); the ones before it are untouched."""


class LeakError(LaunchError):
    """memory.on_leak = fail: raised on every rank at the same step."""


class EchoedError(LaunchError):
    """Another rank's error that this rank learnt of and exits with; that rank logs it.

    Logged here only at debug level, so the user reads it once, not once per rank; it is
    still recorded for the elastic agent, whichever rank's exit the launcher reports.
    """


def user_error_names() -> set[str]:
    """Class names of every LaunchError kind (the launcher drops them from a worker's recorded message).

    Every kind lives in this module, which imports nothing: the launcher, which never imports
    torch, knows them all.
    """
    names, todo = set(), [LaunchError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def write_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be written (the OS's words: "Permission denied", "Read-only file
    system"), after creating it if need be; None when a file can be written there. Asked before
    long work, so the refusal comes first, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None
