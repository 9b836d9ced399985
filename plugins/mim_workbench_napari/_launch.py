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


def open_workbench(viewer, paths: list[str] | None = None) -> dict:
    """Dock the workbench and load ``paths`` (or the sample chest X-ray with its lung mask).

    Returns the dock widgets by name: Workbench, Pretrain, Inspect, Fine-tune.
    """
    if paths:
        for p in paths:
            viewer.open(str(Path(p)), plugin="mim-workbench")
    else:
        viewer.open_sample("mim-workbench", "chest_xray")
    docks = {}
    # the tab docked last is the one shown: Workbench (data & regions) comes first for a new user
    for i, name in enumerate(("Fine-tune", "Inspect", "Pretrain", "Workbench")):
        _, docks[name] = viewer.window.add_plugin_dock_widget("mim-workbench", name, tabify=i > 0)
    return docks
