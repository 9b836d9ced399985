"""Start-up self-check: proves that the workbench window really opens.

``mim-workbench gui --self-check`` and ``napari -w mim-workbench`` with
``MIM_WORKBENCH_SELF_CHECK=FILE`` start exactly as a user's launch does, wait until the
window, its docks and its layers are shown and the canvas has been drawn, then report one
JSON object (napari and Qt versions, the OpenGL renderer, docks, layers, seconds to ready)
and close the window. Users run it to diagnose an install; tests run it to prove the front
door opens.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import napari

ENV_VAR = "MIM_WORKBENCH_SELF_CHECK"
POLL_MS = 100
# the window must look the same for this long before it counts as ready: docks and layers
# arrive over several event-loop turns, and the first paint of the canvas after them
SETTLE_S = 1.0


def process_age_s() -> float:
    """Seconds since this process started (a user's wait includes Python's imports)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # psutil comes with napari; never let the report fail on it
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()
_RUNNING: list[SelfCheck] = []


def _qt_parts(viewer: napari.Viewer) -> tuple[Any, Any]:
    """The main window and the vispy canvas: napari has no public handle on either, and warns
    when a plugin reaches them; a diagnostic has to look at the real window."""
    viewer = getattr(viewer, "__wrapped__", viewer)  # the proxy napari hands to plugin widgets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return viewer.window._qt_window, viewer.window._qt_viewer.canvas._scene_canvas


def gl_renderer(viewer: napari.Viewer) -> str:
    """The OpenGL renderer string of the viewer's canvas, e.g. ``llvmpipe (LLVM 15 …)``."""
    from vispy.gloo import gl

    canvas = _qt_parts(viewer)[1]
    canvas.set_current()
    renderer = gl.glGetParameter(gl.GL_RENDERER)
    version = gl.glGetParameter(gl.GL_VERSION)
    if not renderer:
        raise RuntimeError("the canvas has no OpenGL context")
    return f"{renderer}; OpenGL {version}"


def canvas_box(viewer: napari.Viewer) -> list[int]:
    """The canvas's ``[x, y, width, height]`` in pixels of a whole-window screenshot."""
    window, canvas = _qt_parts(viewer)
    native = canvas.native
    origin = native.mapTo(window, native.rect().topLeft())
    ratio = window.devicePixelRatioF()
    return [round(v * ratio) for v in (origin.x(), origin.y(), native.width(), native.height())]


def workbench_docks(viewer: napari.Viewer) -> list[str]:
    """Display names of the workbench's docks in the window, in docking order."""
    suffix = " (mim-workbench)"
    return [name[: -len(suffix)] for name in viewer.window.dock_widgets if name.endswith(suffix)]


def _snapshot(viewer: napari.Viewer) -> tuple:
    return (tuple(workbench_docks(viewer)), tuple(layer.name for layer in viewer.layers))


class SelfCheck:
    """Polls the event loop until the window is ready, then reports and closes it.

    ``report(record, error)`` gets the JSON record, or ``None`` and a one-line reason.
    """

    def __init__(self, viewer: napari.Viewer, report: Callable[[dict | None, str | None], None], *,
                 expect_docks: Sequence[str] = (), min_layers: int = 0,
                 screenshot: Path | None = None, timeout_s: float = 120.0) -> None:
        from qtpy.QtCore import QTimer

        self.viewer, self.report = viewer, report
        self.expect_docks, self.min_layers = tuple(expect_docks), min_layers
        self.screenshot, self.timeout_s = screenshot, timeout_s
        self._started = time.monotonic()
        self._last: tuple | None = None
        self._stable_since = 0.0
        self._timer = QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)

    def start(self) -> None:
        """Start polling (every :data:`POLL_MS` ms); the check stays referenced until it has reported."""
        _RUNNING.append(self)  # an unreferenced QTimer is collected and never fires
        self._timer.start()

    def _missing(self) -> str:
        if not _qt_parts(self.viewer)[0].isVisible():
            return "the window is not shown"
        docks, layers = _snapshot(self.viewer)
        absent = [d for d in self.expect_docks if d not in docks]
        if absent:
            return f"docks not shown: {', '.join(absent)} (shown: {', '.join(docks) or 'none'})"
        if len(layers) < self.min_layers:
            return f"{len(layers)} layer(s) shown, expected at least {self.min_layers}"
        return ""

    def _poll(self) -> None:
        now = time.monotonic()
        missing = self._missing()
        snap = _snapshot(self.viewer)
        if missing or snap != self._last:
            self._last, self._stable_since = snap, now
        elif now - self._stable_since >= SETTLE_S:
            self._timer.stop()
            self._finish()
            return
        if now - self._started > self.timeout_s:
            self._timer.stop()
            self._fail(f"the window was not ready after {self.timeout_s:.0f} s: {missing or 'still changing'}")

    def _finish(self) -> None:
        _RUNNING.remove(self)
        try:
            record = self._record()
        except Exception as exc:  # noqa: BLE001 — any failure here is the answer the user needs
            self._fail(f"OpenGL is not usable: {type(exc).__name__}: {exc}")
            return
        self.report(record, None)
        self.viewer.close()

    def _fail(self, reason: str) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        self.report(None, reason)
        self.viewer.close()

    def _record(self) -> dict[str, Any]:
        import qtpy

        _qt_parts(self.viewer)[1].native.repaint()
        record: dict[str, Any] = {
            "napari": napari.__version__,
            "qt_api": f"{qtpy.API_NAME} {qtpy.QT_VERSION}",
            "gl_renderer": gl_renderer(self.viewer),
            "docks": workbench_docks(self.viewer),
            "layers": [layer.name for layer in self.viewer.layers],
            "seconds_to_ready": round(process_age_s(), 2),
        }
        if self.screenshot is not None:
            self.screenshot.parent.mkdir(parents=True, exist_ok=True)
            self.viewer.screenshot(str(self.screenshot), canvas_only=False)
            record["screenshot"] = str(self.screenshot)
            record["canvas_box"] = canvas_box(self.viewer)
        return record


def print_report(record: dict | None, error: str | None) -> None:
    """The CLI's reporter: the JSON line on stdout, or the reason on stderr."""
    if error is None:
        print(json.dumps(record), flush=True)
    else:
        print(f"mim-workbench gui --self-check: {error}", file=sys.stderr, flush=True)


_ARMED: set[int] = set()


def arm_from_env(viewer: napari.Viewer) -> None:
    """Under ``napari -w mim-workbench``: run the self-check when ``MIM_WORKBENCH_SELF_CHECK``
    names a file. Every dock calls this; the first one arms the check for its viewer."""
    target = os.environ.get(ENV_VAR)
    if not target or id(viewer) in _ARMED:
        return
    _ARMED.add(id(viewer))
    path = Path(target)

    def write(record: dict | None, error: str | None) -> None:
        """Write the record, or ``{"error": reason}``, to the file as one JSON line; on a failure also say it
        on stderr and end the process with exit code 1."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record if error is None else {"error": error}) + "\n")
        if error is not None:
            print(f"MIM Workbench self-check: {error}", file=sys.stderr, flush=True)
            # napari's launcher exits 0 whatever happens; a failed check must not
            os._exit(1)

    shot = os.environ.get(ENV_VAR + "_SCREENSHOT")
    SelfCheck(viewer, write, expect_docks=(), screenshot=Path(shot) if shot else None).start()
