"""Clean stops: SIGINT / SIGTERM end the run after the current step, with a checkpoint.

Clusters preempt jobs with SIGTERM and people stop them with Ctrl-C; either way the step in flight is
finished, a checkpoint is written and the command exits with the shell's code for the signal (130 for
SIGINT, 143 for SIGTERM). A second SIGINT aborts at once (``KeyboardInterrupt``); further SIGTERMs are
ignored, since torchrun answers a Ctrl-C by sending its workers SIGTERM on top of the terminal's SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType, TracebackType

import torch

from fastdpo.distributed import all_reduce_sum

__all__ = ["StopSignals"]

logger = logging.getLogger("fastdpo")
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread), SIGINT / SIGTERM are recorded instead of ending the process.

    Args:
        save_every_minutes: Minutes after which ``poll`` reports a time-based save as due; 0: never.
    """

    def __init__(self, save_every_minutes: float = 0.0) -> None:
        self.received: int | None = None
        self._seconds = 60.0 * save_every_minutes
        self._last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        # Python delivers signals to the main thread only, and only it may install handlers.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _HANDLED}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        logger.warning(
            "%s received: finishing the current step, then saving a checkpoint and exiting (Ctrl-C again "
            "aborts at once, without a checkpoint)",
            signal.Signals(signum).name,
        )

    def saved(self) -> None:
        """Restarts the clock of time-based saving."""
        self._last_save = time.monotonic()

    def poll(self, is_main: bool) -> tuple[int | None, bool]:
        """``(signal to stop for or None, whether a time-based save is due)``, the same on every rank.

        A signal seen by any rank stops all of them (SIGTERM wins over SIGINT); rank 0's clock decides
        the time-based save. One all-reduce of three numbers under torchrun.
        """
        due = is_main and self._seconds > 0 and time.monotonic() - self._last_save >= self._seconds
        flags = [self.received == signal.SIGINT, self.received == signal.SIGTERM, due]
        sigint, sigterm, due_any = all_reduce_sum(torch.tensor(flags, dtype=torch.int64)).tolist()
        stop = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None
        return (None if stop is None else int(stop)), bool(due_any)
