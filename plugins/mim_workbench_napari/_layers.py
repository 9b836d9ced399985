"""Turn core results (LoadedImage) into napari layer data tuples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mim_workbench.io import LoadedImage

LayerData = tuple[Any, dict, str]


def to_layer_data(loaded: LoadedImage, *, name: str | None = None) -> LayerData:
    """``(data, kwargs, "image" | "labels")`` for napari: named ``name`` or the file's stem, ``scale`` the pixel
    size (mm when known, else 1), the metadata under ``"mim_workbench"``. Masks become ``region: NAME`` Labels;
    grey images get the gray colormap with contrast limits (0, 1)."""
    meta = loaded.meta
    name = name or Path(meta.source).stem
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(loaded.scale),
        "metadata": {"mim_workbench": meta.to_dict(), "source": meta.source},
    }
    if meta.kind == "mask":
        kwargs["name"] = f"region: {name}"
        kwargs["opacity"] = 0.45
        return loaded.data, kwargs, "labels"
    kwargs.update(colormap="gray", contrast_limits=(0.0, 1.0), rgb=bool(meta.color))
    if meta.color:
        kwargs.pop("colormap")
        kwargs.pop("contrast_limits")
    return loaded.data, kwargs, "image"


def viewer_grid(viewer: Any) -> Any:
    """The viewer's grid settings (napari >= 0.9 keeps them on ``viewer.canvas.grid``)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def show_side_by_side(viewer: Any, stride: int = 1) -> None:
    """Grid mode (each layer, or each ``stride`` layers, in a cell of its own), all of it in view."""
    grid = viewer_grid(viewer)
    grid.enabled, grid.stride = True, stride
    viewer.reset_view()

