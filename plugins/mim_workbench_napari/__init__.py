"""napari front end of MIM Workbench: readers, writer, sample data and dock widgets.

A thin skin over :mod:`mim_workbench`: widgets collect settings, call the core and turn
its events into layers. No training or image logic lives here.
"""

__all__ = ["launch"]


def launch(paths: list[str] | None = None) -> int:
    from ._launch import launch as _launch

    return _launch(paths or [])
