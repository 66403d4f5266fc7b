"""User-facing errors: they carry a message that names the value and the fix.

``launch.py`` prints these without a traceback and exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

LEAK_EXIT = 3  # a worker's exit status when the memory detector found a leak (memcheck, on_leak = fail)


class LaunchError(RuntimeError):
    """Bad input or environment, reported as a one-paragraph message."""
