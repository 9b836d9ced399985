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

from mim_workbench.io.pyramid import PYRAMID_THRESHOLD_PIXELS, Pyramid, open_pyramid

LayerData = tuple[Any, dict, str]

#: Single-scale image layers with more pixels than this are reconstructed / predicted tile by tile too.
TILED_THRESHOLD_PIXELS: int = PYRAMID_THRESHOLD_PIXELS


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


def layer_level_for_max_side(layer: Any, max_side: int) -> tuple[int, tuple[int, int], tuple[float, float]]:
    """(level, (h, w), napari scale) of the finest level of an image layer whose longest side is <= ``max_side``.

    Why: masks and strokes painted on a multiscale image live at a reduced level (a
    30000² Labels layer would not fit in memory); with this level's scale they lie
    exactly on the image, and the core resamples them to any other level.  The
    coarsest level when none fits; level 0 of a single-scale layer.
    """
    sy, sx = (float(v) for v in layer.scale[-2:])
    if not layer.multiscale:
        h, w = (int(v) for v in layer.data.shape[:2])
        return 0, (h, w), (sy, sx)
    levels = list(layer.data)
    h0, w0 = (int(v) for v in levels[0].shape[:2])
    pick = next((k for k, a in enumerate(levels) if max(a.shape[:2]) <= max_side), len(levels) - 1)
    h, w = (int(v) for v in levels[pick].shape[:2])
    return pick, (h, w), (sy * h0 / h, sx * w0 / w)


def layer_pyramid(layer: Any) -> Pyramid:
    """The layer's own arrays (file-backed or in memory) as a :class:`Pyramid`, scale = the layer's."""
    from mim_workbench.io.pyramid import pyramid_from_arrays

    levels = list(layer.data) if layer.multiscale else [layer.data]
    window = (layer.metadata.get("mim_workbench_pyramid") or {}).get("window")
    return pyramid_from_arrays(levels, scale=tuple(layer.scale[-2:]), window=tuple(window) if window else None,
                               source=str(layer.metadata.get("source") or layer.name))


def wants_tiled(layer: Any) -> bool:
    """Multiscale layers, and single-scale ones above :data:`TILED_THRESHOLD_PIXELS`, go tile by tile."""
    if layer.multiscale:
        return True
    shape = layer.data.shape[:2]
    return int(shape[0]) * int(shape[1]) > TILED_THRESHOLD_PIXELS


def tiled_root(kind: str) -> Path:
    """Where a dock writes tiled maps: ``$MIM_WORKBENCH_CACHE/<kind>`` (else ``~/.cache/mim-workbench/<kind>``)."""
    import os

    env = os.environ.get("MIM_WORKBENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mim-workbench"
    (base / kind).mkdir(parents=True, exist_ok=True)
    return base / kind
