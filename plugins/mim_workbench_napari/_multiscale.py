"""Large images as napari multiscale layers (pyramids from :mod:`mim_workbench.io.pyramid`).

The reader hands napari the pyramid's levels as dask arrays over the zarr store,
finest first, with ``multiscale=True``: napari reads only the tiles on screen at
the level that matches the zoom, so a 30000² slide opens in well under a second
and memory does not grow with the image.  ``scale`` is level 0's pixel size (mm
from DICOM ``ImagerPixelSpacing``/``PixelSpacing`` or TIFF resolution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mim_workbench.io.pyramid import Pyramid, open_pyramid

LayerData = tuple[Any, dict, str]


def pyramid_layer_data(pyr: Pyramid, *, name: str | None = None) -> LayerData:
    """(levels, kwargs, "image") for ``viewer._add_layer_from_data`` / a reader."""
    meta = pyr.meta
    kwargs: dict[str, Any] = {
        "name": name or Path(meta.source).stem,
        "scale": tuple(pyr.scale(0)),
        "multiscale": True,
        "rgb": pyr.color,
        "metadata": {
            "mim_workbench": meta.to_dict(),
            "source": meta.source,
            "mim_workbench_pyramid": {
                "store": str(pyr.store) if pyr.store else None,
                "built": pyr.built,
                "window": list(pyr.window),
                "levels": [list(pyr.level_shape(k)) for k in range(len(pyr.levels))],
            },
        },
    }
    if not pyr.color:
        kwargs.update(colormap="gray", contrast_limits=tuple(float(v) for v in pyr.window))
    return pyr.dask_levels(), kwargs, "image"


def read_pyramid_layer(path: str | Path) -> LayerData:
    """Open (building and caching when needed) and wrap one large image; colour kept for slides."""
    return pyramid_layer_data(open_pyramid(path, keep_color=True))
