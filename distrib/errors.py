"""User-facing errors: they carry a message that names the value and the fix.

``launch.py`` prints these without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

LEAK_EXIT = 3  # a worker's exit status when the memory detector found a leak (memcheck, on_leak = fail)


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
