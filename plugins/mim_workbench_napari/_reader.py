"""napari reader: DICOM (files, extension-less files, folders), PNG/JPEG/TIFF, zarr, npy.

Files whose name or folder says "mask" open as region Labels layers. Large images
(above ``PYRAMID_THRESHOLD_PIXELS``, or pyramidal TIFF / OME-Zarr) open as multiscale
layers over an on-disk zarr pyramid (see ``_multiscale``). Read errors become
a napari notification naming the file (and nothing is added), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mim_workbench.errors import MimError
from mim_workbench.io import is_supported, read_mask, read_path
from mim_workbench.io.pyramid import wants_pyramid

from ._layers import LayerData, to_layer_data


def _looks_like_mask(path: Path) -> bool:
    words = (path.stem.lower(), path.parent.name.lower())
    return any("mask" in w for w in words)


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari reader hook: :func:`read_layers` when every path is one this plugin reads (checked from names
    and headers, nothing decoded), else None so napari tries other readers."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(is_supported(p) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Layer data for each path, in order: mask files as ``region: NAME`` Labels layers, large or pyramidal
    images as one multiscale image layer, others as one layer per image. A path that fails to read (MimError)
    becomes an error notification and adds no layer; the error is not raised."""
    paths = [path] if isinstance(path, str) else list(path)
    layers: list[LayerData] = []
    for p in map(Path, paths):
        try:
            if p.is_file() and _looks_like_mask(p) and p.suffix.lower() in (".png", ".tif", ".tiff", ".npy"):
                layers.append((read_mask(p), {"name": f"region: {p.stem}", "opacity": 0.45,
                                              "metadata": {"source": str(p)}}, "labels"))
            elif wants_pyramid(p):  # large or already pyramidal: a multiscale layer over zarr
                from ._multiscale import read_pyramid_layer

                layers.append(read_pyramid_layer(p))
            else:
                layers.extend(to_layer_data(li) for li in read_path(p))
        except MimError as exc:
            _notify_error(str(exc))
    return layers


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # napari absent (core tests): surface it as a warning instead
        import warnings

        warnings.warn(message, stacklevel=2)
