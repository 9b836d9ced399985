"""Stop / pause requests into a running training loop.

The loop only *polls* a control object (once per step), so a GUI, a signal handler
or a test can steer it without callbacks into the loop.  ``ProcessControl`` is
backed by ``multiprocessing.Event`` and therefore works across threads and across
a spawned child process: create it in the parent, pass it to the child as a
``Process`` argument.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext
from typing import Protocol, runtime_checkable


@runtime_checkable
class Control(Protocol):
    def stop_requested(self) -> bool:
        """True once the loop should save a checkpoint and finish; polled once per step."""
        ...

    def pause_requested(self) -> bool:
        """True while the loop should sleep-poll between steps; a stop request ends the pause."""
        ...


class NullControl:
    """Never stops, never pauses."""

    def stop_requested(self) -> bool:
        """Always False."""
        return False

    def pause_requested(self) -> bool:
        """Always False."""
        return False


class ProcessControl:
    """Thread- and process-safe control over two ``multiprocessing.Event`` flags.

    ``ctx`` must be the multiprocessing context of the process that will run the
    loop (semaphores of a fork context cannot be handed to a spawned child); the
    default is "spawn", which the GUI uses so that CUDA and Qt stay out of the child.
    """

    def __init__(self, ctx: BaseContext | None = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._pause = ctx.Event()

    def request_stop(self) -> None:
        """Ask the loop to save a checkpoint and finish; also ends a pause."""
        self._stop.set()
        self._pause.clear()

    def request_pause(self) -> None:
        """Ask the loop to wait between steps until ``resume`` or ``request_stop``."""
        self._pause.set()

    def resume(self) -> None:
        """End a pause; does nothing when not paused."""
        self._pause.clear()

    def stop_requested(self) -> bool:
        """True once ``request_stop`` was called, in any process sharing this object."""
        return self._stop.is_set()

    def pause_requested(self) -> bool:
        """True between ``request_pause`` and ``resume`` (or ``request_stop``)."""
        return self._pause.is_set()
