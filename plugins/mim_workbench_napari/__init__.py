"""napari front end of MIM Workbench: readers, writer, sample data and dock widgets.

A thin skin over :mod:`mim_workbench`: widgets collect settings, call the core and turn
its events into layers. No training or image logic lives here.
"""

import sys

# Loading triton (pulled in by torchvision/timm through torch._dynamo) after napari has made
# its GL context segfaulted on Mesa (LLVM loaded twice). The viewer process never compiles
# kernels (training runs in a spawned child process, which does not inherit this), so tell
# torch that triton is absent here; torch handles the ImportError as "no triton".
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

__all__ = ["launch"]


def launch(paths: list[str] | None = None, **options) -> int:
    """Open napari with the workbench docked; see :func:`._launch.launch` for ``options``."""
    from ._launch import launch as _launch

    return _launch(paths or [], **options)
