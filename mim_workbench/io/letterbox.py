"""Aspect-preserving resize into a fixed (H, W) canvas ("letterbox").

Why letterbox instead of stretching: X-rays come in every aspect ratio (dental
panoramics are 2:1), and stretching would distort anatomy the model must learn.

Placement: the content is anchored at the **top-left** corner and padded with 0
at the bottom and right. That keeps the mapping back to the source a pure
scale (``offset`` is always (0, 0), stored anyway so callers never assume it),
and makes the coarse and fine (2x) letterboxes share the same origin.

Resampling (skimage.transform.resize): images with ``order=1`` (bilinear) and
Gaussian anti-aliasing when shrinking; masks with ``order=0`` (nearest) and no
anti-aliasing, keeping their dtype and {0, 1} values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.io.meta import is_dask

if TYPE_CHECKING:
    import dask.array as da
    import numpy.typing as npt


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox: maps canvas pixels back to the source."""

    source_shape: tuple[int, int]  # (H, W) of the input
    size: tuple[int, int]  # (H, W) of the canvas
    content_shape: tuple[int, int]  # (h, w) of the resized image inside the canvas
    offset: tuple[int, int] = (0, 0)  # (row, col) of the content's top-left corner

    @property
    def scale(self) -> tuple[float, float]:
        """(row, col) canvas pixels per source pixel (equal up to rounding)."""
        return (self.content_shape[0] / self.source_shape[0], self.content_shape[1] / self.source_shape[1])

    def to_source(self, rows: npt.ArrayLike, cols: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Canvas pixel coordinates -> source pixel coordinates (pixel centres), float64 of the inputs' shapes."""
        sr, sc = self.scale
        r = (np.asarray(rows, dtype=np.float64) - self.offset[0] + 0.5) / sr - 0.5
        c = (np.asarray(cols, dtype=np.float64) - self.offset[1] + 0.5) / sc - 0.5
        return r, c

    def to_canvas(self, rows: npt.ArrayLike, cols: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Source pixel coordinates -> canvas pixel coordinates (pixel centres), float64 of the inputs' shapes."""
        sr, sc = self.scale
        r = (np.asarray(rows, dtype=np.float64) + 0.5) * sr - 0.5 + self.offset[0]
        c = (np.asarray(cols, dtype=np.float64) + 0.5) * sc - 0.5 + self.offset[1]
        return r, c

    def crop(self, canvas: np.ndarray) -> np.ndarray:
        """The content part of a canvas-shaped array (drops the padding)."""
        (r0, c0), (h, w) = self.offset, self.content_shape
        return canvas[r0 : r0 + h, c0 : c0 + w]

    def restore(self, canvas: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Resize the content of a canvas-shaped result back to the source shape."""
        content = self.crop(np.asarray(canvas))
        return resize_to(content, self.source_shape, order=order)


def fit_shape(source_shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Largest (h, w) with the source's aspect ratio that fits ``size`` (each >= 1)."""
    h, w = int(source_shape[0]), int(source_shape[1])
    th, tw = int(size[0]), int(size[1])
    k = min(th / h, tw / w)
    return (max(1, min(th, round(h * k))), max(1, min(tw, round(w * k))))


def resize_to(array: np.ndarray | da.Array, shape: tuple[int, int], *, order: int = 1) -> np.ndarray:
    """Resize (H, W[, C]) to ``shape``: anti-aliased when shrinking with order > 0, exact dtype for order 0.

    Returns a numpy ``shape + (C,)`` copy: float32 when resampled with order > 0, else the input's dtype.
    """
    from skimage.transform import resize

    array = _reduce_lazy(array, shape, order) if is_dask(array) else np.asarray(array)
    shape = (int(shape[0]), int(shape[1]))
    if tuple(array.shape[:2]) == shape:
        return array.copy()
    out_shape = shape + tuple(array.shape[2:])
    if order == 0:
        out = resize(array, out_shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
        return out.astype(array.dtype, copy=False)
    shrinking = shape[0] < array.shape[0] or shape[1] < array.shape[1]
    out = resize(array.astype(np.float32, copy=False), out_shape, order=order, mode="edge",
                 anti_aliasing=shrinking, preserve_range=True)
    return out.astype(np.float32, copy=False)


def _reduce_lazy(array: da.Array, shape: tuple[int, int], order: int) -> np.ndarray:
    """Block-average a huge dask array close to ``shape`` before computing it.

    This keeps memory bounded for whole-slide-sized inputs. Edge pixels that do
    not fill a whole block (fewer than the factor) are trimmed, a sub-pixel
    error at the target size. Nearest-neighbour (``order=0``) subsamples instead
    of averaging so label values survive.
    """
    import dask.array as da

    f = int(min(array.shape[0] / shape[0], array.shape[1] / shape[1]) // 2)
    if f >= 2 and order == 0:
        array = array[::f, ::f]
    elif f >= 2:
        axes = {0: f, 1: f}
        array = da.coarsen(np.mean, array.astype(np.float32), axes, trim_excess=True)
    return np.asarray(array.compute())


def letterbox(
    array: np.ndarray | da.Array, size: tuple[int, int] | int, *, order: int = 1
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio to fit ``size`` (H, W), pad bottom/right with 0.

    Works on (H, W) and (H, W, C) numpy or dask arrays. Returns the canvas and
    the :class:`Letterbox` geometry for mapping results back.
    """
    if isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    source_shape = (int(array.shape[0]), int(array.shape[1]))
    content_shape = fit_shape(source_shape, size)
    content = resize_to(array, content_shape, order=order)
    canvas = place(content, size)
    return canvas, Letterbox(source_shape=source_shape, size=size, content_shape=content_shape)


def place(content: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Put ``content`` at the top-left of a zero canvas of ``size`` (extra axes kept)."""
    canvas = np.zeros((int(size[0]), int(size[1])) + tuple(content.shape[2:]), dtype=content.dtype)
    canvas[: content.shape[0], : content.shape[1]] = content
    return canvas
