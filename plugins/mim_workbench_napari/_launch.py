"""``mim-workbench gui``: napari with the workbench docked and a sample chest X-ray loaded."""

from __future__ import annotations

from pathlib import Path


def launch(paths: list[str]) -> int:
    # torch (and triton, which it may pull in) must be imported before napari creates its
    # GL context: importing triton afterwards segfaulted on Mesa/Xvfb.
    import torch  # noqa: F401

    import napari

    viewer = napari.Viewer(title="MIM Workbench")
    open_workbench(viewer, paths)
    napari.run()
    return 0


def open_workbench(viewer, paths: list[str] | None = None):
    """Dock the workbench and load ``paths`` (or the sample chest X-ray with its lung mask)."""
    if paths:
        for p in paths:
            viewer.open(str(Path(p)), plugin="mim-workbench")
    else:
        viewer.open_sample("mim-workbench", "chest_xray")
    # the tab docked last is the one shown: Workbench (data & regions) comes first for a new user
    viewer.window.add_plugin_dock_widget("mim-workbench", "Inspect")
    viewer.window.add_plugin_dock_widget("mim-workbench", "Pretrain", tabify=True)
    _, widget = viewer.window.add_plugin_dock_widget("mim-workbench", "Workbench", tabify=True)
    return widget
