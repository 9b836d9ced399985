"""One training job in a child process, supervised from a napari thread worker.

Shared by the Pretrain and Fine-tune docks: the worker thread only moves events
from the child's queue to the GUI thread (``on_event``); the training itself never
runs in the viewer's process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari.qt.threading import GeneratorWorker

    from mim_workbench.study import StudyProgress
    from mim_workbench.training.events import Progress
    from mim_workbench.training.runner import TrainingProcess


class BackgroundRun:
    """Start / pause / stop one job; ``on_event`` runs on the GUI thread for every event."""

    def __init__(self, on_event: Callable[[Any], None], on_done: Callable[[], None]) -> None:
        self.on_event = on_event
        self.on_done = on_done
        self.run = None
        self.worker = None
        self.paused = False
        self.closed = False   # the widget is gone: events still in flight must not touch it
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    @property
    def active(self) -> bool:
        """True from :meth:`start` until the job's end has reached the GUI thread."""
        return self.worker is not None

    def start(self, task: str, config: dict[str, Any]) -> None:
        """Run ``task`` (pretrain, finetune, dense or a ``mim_workbench.…:function`` job) on ``config`` in a
        spawned child process, supervised by a thread worker; not paused. ValueError for an unknown task."""
        from napari.qt.threading import thread_worker

        from mim_workbench.training.runner import TrainingProcess

        self.run = TrainingProcess(config, task=task)
        self.paused = False

        @thread_worker
        def supervise(run: TrainingProcess):
            """In the worker thread: start ``run`` and yield its events until it has ended."""
            run.start()
            while run.running:
                yield from run.poll(0.1)

        self.worker = supervise(self.run)
        self.worker.yielded.connect(self._deliver)
        self.worker.finished.connect(self._finished)
        self.worker.start()

    def toggle_pause(self) -> bool:
        """Pause or continue; returns True when now paused."""
        if self.run is None:
            return False
        if self.paused:
            self.run.resume()
        else:
            self.run.pause()
        self.paused = not self.paused
        return self.paused

    def stop(self) -> None:
        """Ask the job to checkpoint and finish at its next step."""
        if self.run is not None:
            self.run.stop()

    def shutdown(self, *_: Any) -> None:
        """Viewer closing: ask the job to checkpoint and stop, wait briefly, then end it."""
        self.closed = True
        run, self.run = self.run, None
        if run is None or not run.running:
            return
        run.stop()
        run.join(timeout=30)
        run.terminate()

    def _deliver(self, event: Any) -> None:
        if not self.closed:
            self.on_event(event)

    def _finished(self) -> None:
        self.worker = None
        if not self.closed:
            self.on_done()


class RunControls:
    """Start / Pause / Stop behaviour shared by the training docks.

    A dock mixing this in has ``job`` (a :class:`BackgroundRun`), ``start``, ``pause`` and
    ``stop`` (buttons), ``status`` (a label), ``plot`` (a loss plot) and ``_settings()``: the
    widgets a running job must not change.
    """

    stop_message = "stopping…"
    #: Progress reaches the dock's widgets at most this often: every repaint of the dock (label,
    #: bar, curve) costs the viewer's event loop ~8 ms, two to three times that while training
    #: competes for the CPU; a repaint per step (~0.3 s) gave p99 gaps of 28 ms, one a second
    #: 20–22 ms, one every two seconds 18.5 ms (bench_gui_latency.py, Xvfb + llvmpipe).
    progress_interval_ms = 2000
    _pending_progress = None
    _progress_timer = None

    def _progress_later(self, event: Progress | StudyProgress) -> None:
        """Show ``event`` (the newest Progress) within ``progress_interval_ms``."""
        self._pending_progress = event
        if self._progress_timer is None:
            from qtpy.QtCore import QTimer

            self._progress_timer = QTimer()
            self._progress_timer.setSingleShot(True)
            self._progress_timer.setInterval(self.progress_interval_ms)
            self._progress_timer.timeout.connect(self._flush_progress)
        if not self._progress_timer.isActive():
            self._progress_timer.start()

    def _flush_progress(self) -> None:
        event, self._pending_progress = self._pending_progress, None
        if event is None or self.job.closed:
            return
        # QProgressBar repaints at once when its text changes, and every repaint composes the whole
        # window (~8 ms on software GL): with updates held, bar, status line and curve reach the
        # screen in one repaint instead of two (15 -> 8 ms per refresh, Xvfb + llvmpipe).
        self.native.setUpdatesEnabled(False)
        try:
            self._render_progress(event)
        finally:
            self.native.setUpdatesEnabled(True)
        self.plot.canvas.update()

    def _render_progress(self, event: Progress | StudyProgress) -> None:
        raise NotImplementedError

    def _settings(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def _set_running(self, running: bool) -> None:
        """While a job runs Pause and Stop are on; Start and every setting are off."""
        self.pause.enabled = self.stop.enabled = running
        for w in (self.start, *self._settings()):
            w.enabled = not running

    def _launch(self, task: str, config: dict[str, Any]) -> None:
        self.plot.clear()
        self.pause.text = "Pause"
        self.job.start(task, config)
        self._set_running(True)
        self.status.value = "starting…"

    def toggle_pause(self) -> None:
        """Pause or continue the job (Pause button); the button and the status say which. No job: nothing."""
        if self.job.run is None:
            return
        paused = self.job.toggle_pause()
        self.pause.text = "Continue" if paused else "Pause"
        self.status.value = "paused" if paused else "resumed"

    def stop_training(self) -> None:
        """Ask the job to checkpoint and stop at its next step; the status shows ``stop_message``."""
        if self.job.run is not None:
            self.job.stop()
            self.status.value = self.stop_message

    @property
    def worker(self) -> GeneratorWorker | None:
        """The thread worker supervising the job; None while no job runs."""
        return self.job.worker

    @property
    def run(self) -> TrainingProcess | None:
        """The job's child process: None before the first start and after shutdown; kept once it ends."""
        return self.job.run
