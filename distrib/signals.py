"""Cancellation: SIGTERM or SIGINT asks a run to stop at the next step boundary; a second one ends it now.

Why not Python's defaults: SIGTERM kills a rank mid-step (no checkpoint, and the agent's
traceback), SIGINT raises KeyboardInterrupt wherever the rank happens to be (53 lines of
traceback). Here the first signal only sets a flag; the training loop looks at it after
every optimizer step, every rank agrees through one small all-reduce, rank 0 writes a
checkpoint and all exit with 128 + the signal's number and one log line.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopRequest:
    """Set by the first SIGTERM/SIGINT; read by the loop at step boundaries."""

    signum: int = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def handle(self, signum: int, frame: object) -> None:
        if self.signum:  # the second signal: no more waiting
            os._exit(128 + signum)
        self.signum = signum


class Stopped(Exception):  # noqa: N818 - the run ended on request, not an error
    """The run stopped at a step boundary on a signal; its checkpoint is written."""

    def __init__(self, request: StopRequest, message: str):
        super().__init__(message)
        self.exit_code = request.exit_code


def install() -> StopRequest:
    """Route SIGTERM and SIGINT to a fresh :class:`StopRequest` (main thread only)."""
    request = StopRequest()
    for sig in SIGNALS:
        signal.signal(sig, request.handle)
    return request
