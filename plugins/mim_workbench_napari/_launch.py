"""``mim-workbench gui``: napari with the workbench docked and a sample chest X-ray loaded."""

from __future__ import annotations

from pathlib import Path


def launch(paths: list[str]) -> int:
    # torch, timm/torchvision and triton (which they pull in) must be loaded before napari
    # creates its GL context: loading triton afterwards segfaulted on Mesa/Xvfb.
    import torch  # noqa: F401

    import mim_workbench.inference.reconstruct  # noqa: F401
    import mim_workbench.training  # noqa: F401

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
    viewer.window.add_plugin_dock_widget("mim-workbench", "Fine-tune")
    viewer.window.add_plugin_dock_widget("mim-workbench", "Inspect", tabify=True)
    viewer.window.add_plugin_dock_widget("mim-workbench", "Pretrain", tabify=True)
    _, widget = viewer.window.add_plugin_dock_widget("mim-workbench", "Workbench", tabify=True)
    return widget
