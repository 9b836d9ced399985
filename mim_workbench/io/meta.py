"""Result types shared by every reader: :class:`ImageMeta` and :class:`LoadedImage`.

The metadata travels with the pixels so that the GUI can set the napari layer
``scale`` and the CLI ``info`` command can explain *how* stored values became
[0, 1] (window and where it came from). Nothing here touches the file system.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np

#: Images with more pixels than this (rows x cols, 32 megapixels) are returned
#: as lazy dask arrays.  Readers look the value up at call time through
#: :func:`is_large`, so tests may monkeypatch ``mim_workbench.io.meta.LAZY_THRESHOLD_PIXELS``.
LAZY_THRESHOLD_PIXELS: int = 32_000_000

WINDOW_SOURCES = ("voi_lut", "dicom_window", "percentile", "dtype_range", "minmax")

ArrayLike = Union[np.ndarray, Any]  # np.ndarray | dask.array.Array


def is_large(shape: tuple[int, ...]) -> bool:
    """True when an image of ``shape`` must be served lazily (above the threshold)."""
    if len(shape) < 2:
        return False
    return int(shape[0]) * int(shape[1]) > LAZY_THRESHOLD_PIXELS


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and tuples as plain JSON types and non-finite floats as None
    (JSON has no inf or nan)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class ImageMeta:
    """What a reader knows about the returned pixels and how they were produced."""

    source: str
    kind: str  # "image" | "mask"
    shape: tuple[int, ...]
    spacing: tuple[float, float] | None  # (row, col) in mm
    modality: str | None
    photometric: str | None
    original_dtype: str
    original_range: tuple[float, float]
    window: tuple[float, float] | None  # (center, width) mapped to [0, 1]
    window_source: str
    color: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (tuples become lists, NaN becomes None)."""
        return json_safe(asdict(self))


@dataclass
class LoadedImage:
    """Pixels plus metadata. ``data`` is float32 in [0, 1] for images, uint8 {0, 1} for masks."""

    data: ArrayLike
    meta: ImageMeta
    lazy: bool = False

    @property
    def scale(self) -> tuple[float, float]:
        """Pixel size for the napari layer ``scale``: spacing in mm, else (1, 1)."""
        if self.meta.spacing is None:
            return (1.0, 1.0)
        return (float(self.meta.spacing[0]), float(self.meta.spacing[1]))


def is_dask(array: Any) -> bool:
    """True for a dask array, checked without importing dask (keeps ``import mim_workbench.io`` light)."""
    cls = type(array)
    return cls.__name__ == "Array" and cls.__module__.startswith("dask.array")
