"""Run a training job (pretrain, finetune, dense) in a child process and stream its events back.

Why a process and not a thread: training in a GUI thread slows the viewer (micro-sam
removed its thread workers for this) and GPU memory is only returned when the process
that took it exits. The child is started with "spawn" so it inherits neither Qt nor an
initialised CUDA context; events come back on a multiprocessing queue, stop/pause go
down through :class:`ProcessControl`. The caller (a napari ``thread_worker``, or any
loop) polls :meth:`TrainingProcess.poll`.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from .control import ProcessControl
from .events import Event, Failed, Finished

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

_DONE = "__mim_workbench_done__"


def default_threads() -> int:
    """Leave the GUI one core: torch threads = cores − 1 (at least 1)."""
    return max(1, (os.cpu_count() or 2) - 1)


def _watch_parent(parent_pid: int, events: Queue, control: ProcessControl, every_s: float = 1.0) -> None:
    """Checkpoint and stop when the parent (the viewer) dies without asking: killed, crashed.

    Without this an orphaned run trains on for hours, holding a GPU nobody watches.
    """
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    events.cancel_join_thread()  # nobody reads the queue any more: never block on exit
    control.request_stop()


#: The training child's niceness: when the viewer and training want the same core, the viewer
#: (its event loop, and software GL's render threads) goes first.
CHILD_NICENESS = 10


def _child_main(task: str, config: dict[str, Any], events: Queue, control: ProcessControl,
                parent_pid: int | None = None) -> None:
    if hasattr(os, "nice"):
        try:
            os.nice(CHILD_NICENESS)
        except OSError:
            pass   # not allowed here: train at normal priority
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid, events, control), daemon=True,
                         name="mim-workbench-parent-watch").start()
    try:
        from .tasks import run_task

        run_task(task, config, on_event=events.put, control=control)
    except BaseException as exc:  # report every failure; the parent must never hang waiting
        events.put(Failed(message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))
    finally:
        events.put(_DONE)


class TrainingProcess:
    """A training job (:data:`~.tasks.TASKS`) in a spawned child process.

    >>> run = TrainingProcess(config.to_dict()); run.start()
    >>> while run.running: handle(run.poll(0.1))
    """

    def __init__(self, config: dict[str, Any], task: str = "pretrain") -> None:
        from .tasks import TASKS, is_task

        if not is_task(task):
            raise ValueError(f"task={task!r}: choose one of {', '.join(TASKS)} or give module:function")
        cfg = dict(config)
        # a dense job keeps its training settings one level down
        settings = cfg.setdefault("config", {}) if task == "dense" else cfg
        if settings.get("threads") is None:
            settings["threads"] = default_threads()
        self.task = task
        self.config = cfg
        self._ctx = multiprocessing.get_context("spawn")
        self._events = self._ctx.Queue()
        self.control = ProcessControl(self._ctx)
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._done = False
        self.finished: Finished | None = None
        self.failed: Failed | None = None

    def start(self) -> None:
        """Spawn the child process, which runs the task and puts its events on the queue."""
        self._proc = self._ctx.Process(
            target=_child_main, args=(self.task, self.config, self._events, self.control, os.getpid()),
            name=f"mim-workbench-{self.task}", daemon=True)
        self._proc.start()

    @property
    def running(self) -> bool:
        """True until ``poll`` has seen the child's end (its last event, or its unannounced exit)."""
        return not self._done

    def poll(self, timeout: float = 0.1) -> list[Event]:
        """Events that arrived, waiting up to ``timeout`` for the first one."""
        out: list[Event] = []
        block = True
        while not self._done:
            try:
                item = self._events.get(timeout=timeout) if block else self._events.get_nowait()
            except queue_mod.Empty:
                break
            block = False
            if isinstance(item, str) and item == _DONE:
                self._done = True
                break
            if isinstance(item, Finished):
                self.finished = item
            elif isinstance(item, Failed):
                self.failed = item
            out.append(item)
        if not self._done and self._proc is not None and not self._proc.is_alive() and self._events.empty():
            # The child died without saying so (killed, out of memory): report it, never hang.
            self._done = True
            msg = f"training process exited unexpectedly (exit code {self._proc.exitcode})"
            self.failed = Failed(message=msg)
            out.append(self.failed)
        return out

    def pause(self) -> None:
        """Ask the loop to wait between steps until ``resume`` or ``stop``."""
        self.control.request_pause()

    def resume(self) -> None:
        """End a pause."""
        self.control.resume()

    def stop(self) -> None:
        """Ask the loop to checkpoint and finish; it ends at the next step."""
        self.control.request_stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (None: for ever) for the child to exit; returns at once if never started."""
        if self._proc is not None:
            self._proc.join(timeout)

    def terminate(self) -> None:
        """Last resort when a stop request is not honoured in time."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
