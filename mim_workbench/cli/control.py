"""The run control that long CLI commands hand to the core: Ctrl-C asks for a clean stop."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType


class StopOnSignal:
    """Control for the CLI: the first Ctrl-C asks for a clean stop, the second interrupts.

    Used as a context manager; it installs its SIGINT handler only on the main thread
    (signals cannot be caught elsewhere) and puts the previous handler back on exit.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._old: Any = None

    def stop_requested(self) -> bool:
        """True once Ctrl-C was pressed: the run should stop after its current step and save."""
        return self._stop.is_set()

    def pause_requested(self) -> bool:
        """Always False: the command line has no pause."""
        return False

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt
        self._stop.set()
        print("\nmim-workbench pretrain: stopping after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)
