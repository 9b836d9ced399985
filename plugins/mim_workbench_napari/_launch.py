"""``mim-workbench gui``: napari with the workbench docked and a sample chest X-ray loaded."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mim_workbench.display import has_display
from mim_workbench.errors import MimError

if TYPE_CHECKING:
    import napari

DOCKS = ("Workbench", "Pretrain", "Inspect", "Fine-tune", "Evaluate", "Embedding map")


class LaunchError(MimError):
    """The window cannot open here; the message says what is missing."""


def check_display() -> None:
    """Refuse, with the reason, where Qt would abort the process on its first window."""
    if not has_display():
        raise LaunchError("no display: DISPLAY and WAYLAND_DISPLAY are unset (on a server run "
                          "'xvfb-run -a mim-workbench gui …', or 'mim-workbench demo' for the headless demo)")
    display = os.environ.get("DISPLAY", "")
    # a local X display ":N" listens on /tmp/.X11-unix/XN; Qt aborts if nothing does
    if sys.platform.startswith("linux") and display.startswith(":") and not os.environ.get("WAYLAND_DISPLAY"):
        number = display[1:].split(".")[0]
        if number.isdigit() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            raise LaunchError(f"no X server answers on DISPLAY={display} (/tmp/.X11-unix/X{number} is missing)")


def choose_qt_binding() -> str:
    """Import the Qt binding napari will use; PyQt6 wins where several are installed.

    qtpy alone would pick PyQt5 first; ``QT_API`` set by the user is respected.
    """
    if not os.environ.get("QT_API") and importlib.util.find_spec("PyQt6") is not None:
        os.environ["QT_API"] = "pyqt6"
    try:
        import qtpy
    except Exception as exc:  # qtpy raises its own error types when no binding imports
        raise LaunchError(f"no Qt binding could be imported ({exc}); install PyQt6 with "
                          "pip install 'mim-workbench[gui]', or PyQt5 with 'mim-workbench[gui-pyqt5]'") from exc
    return qtpy.API_NAME


def launch(paths: list[str], *, self_check: bool = False, screenshot: Path | None = None,
           timeout_s: float = 120.0) -> int:
    """Open the workbench and run napari's event loop; with ``self_check`` report and close.

    Returns the exit code: 0, or 1 when the self-check failed (its reason is on stderr).
    Raises :class:`LaunchError` when the window cannot open (no display, no Qt binding,
    no OpenGL, a dock that fails to load).
    """
    check_display()
    choose_qt_binding()
    # torch, timm/torchvision and triton (which they pull in) must be loaded before napari
    # creates its GL context: loading triton afterwards segfaulted on Mesa/Xvfb.
    import torch  # noqa: F401

    import mim_workbench.inference.reconstruct  # noqa: F401
    import mim_workbench.training  # noqa: F401

    try:
        import napari
    except ImportError as exc:
        raise LaunchError(f"napari is not installed ({exc}); pip install 'mim-workbench[gui]'") from exc
    try:
        viewer = napari.Viewer(title="MIM Workbench")
    except Exception as exc:  # noqa: BLE001 — Qt/vispy raise many types for "no OpenGL"
        raise LaunchError(f"napari could not open its window (OpenGL or Qt): {type(exc).__name__}: {exc}") from exc
    open_workbench(viewer, paths)
    if not self_check:
        napari.run()
        return 0
    return _run_self_check(viewer, screenshot, timeout_s)


def _run_self_check(viewer, screenshot: Path | None, timeout_s: float) -> int:
    import napari

    from ._self_check import SelfCheck, print_report

    failed: list[str] = []

    def report(record: dict | None, error: str | None) -> None:
        """Print the outcome (JSON on stdout, or the reason on stderr) and remember a failure for the exit code."""
        print_report(record, error)
        if error is not None:
            failed.append(error)

    SelfCheck(viewer, report, expect_docks=DOCKS, min_layers=1, screenshot=screenshot,
              timeout_s=timeout_s).start()
    napari.run()
    return 1 if failed else 0


def open_workbench(viewer: napari.viewer.Viewer, paths: list[str] | None = None) -> dict:
    """Dock the workbench and load ``paths`` (or the sample chest X-ray with its lung mask).

    Returns the dock widgets by name (``DOCKS``). Raises
    :class:`LaunchError` naming the dock that failed to load, or the path that failed to open.
    """
    for p in paths or []:
        try:
            viewer.open(str(Path(p)), plugin="mim-workbench")
        except Exception as exc:  # noqa: BLE001 — napari wraps reader errors in its own types
            cause = exc.__cause__ or exc
            raise LaunchError(f"cannot open {p}: {cause}") from exc
    if not paths:
        viewer.open_sample("mim-workbench", "chest_xray")
    docks = {}
    # the tab docked last is the one shown: Workbench (data & regions) comes first for a new user
    for i, name in enumerate(reversed(DOCKS)):
        try:
            _, docks[name] = viewer.window.add_plugin_dock_widget("mim-workbench", name, tabify=i > 0)
        except Exception as exc:  # noqa: BLE001 — npe2 and the widget's own code raise anything
            raise LaunchError(f"the plugin's {name} dock failed to load: {type(exc).__name__}: {exc}") from exc
    # the docks narrow the canvas once Qt lays the window out: fit the image to what is left
    from qtpy.QtCore import QTimer

    QTimer.singleShot(0, viewer.reset_view)
    return docks
