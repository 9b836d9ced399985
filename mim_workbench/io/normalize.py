"""Mapping stored pixel values to float32 in [0, 1].

Why a fixed, documented rule: a model trained on [0, 1] inputs must see the
same mapping at inference, and a user must be able to tell (``mim-workbench info``)
which window produced what they see.

Rule for non-DICOM rasters (PNG, JPEG, TIFF, npy, zarr), by stored dtype:

* ``bool``: False -> 0, True -> 1 (``dtype_range``).
* 8-bit integers: divided by the dtype range (``uint8``: /255) (``dtype_range``).
* ``uint16``: if the top bit is used (max >= 32768) the full dtype range
  0..65535 is used (``dtype_range``). Otherwise the image uses fewer bits
  (typical 10/12/14-bit detector data in a 16-bit container), and the dtype
  range would make it nearly black, so the data's own min..max is used
  (``minmax``). A note records which.
* other integers (``int16``, ``int32``, ...): min..max (``minmax``).
* floats: already in [0, 1] -> kept as is (``dtype_range``); otherwise
  min..max (``minmax``). NaN or Inf anywhere is an error, never clipped.

A constant image maps to all zeros (with a note) rather than dividing by zero.
DICOM uses its own pipeline (:mod:`mim_workbench.io.dicom`); its fallback
window is :func:`percentile_window` (0.5-99.5 %).

Every function accepts numpy arrays and dask arrays; with dask the mapping stays
lazy (statistics are computed chunk by chunk).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io.meta import is_dask

if TYPE_CHECKING:
    import dask.array as da

PERCENTILES = (0.5, 99.5)
#: Percentiles of larger images are estimated on a regular subsample of about this many pixels.
PERCENTILE_SAMPLE_PIXELS = 4_000_000

#: ITU-R BT.709 luma weights (the same as skimage.color.rgb2gray).
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)


def _compute(*values: Any) -> list[float]:
    """Evaluate scalars that may be dask-lazy, returning Python floats."""
    if any(is_dask(v) for v in values):
        import dask

        values = dask.compute(*values)
    return [float(v) for v in values]


def min_max(array: np.ndarray | da.Array) -> tuple[float, float]:
    """(min, max) of an array; one pass, chunked for dask."""
    lo, hi = _compute(array.min(), array.max())
    return lo, hi


def check_finite(array: np.ndarray | da.Array, path: str) -> None:
    """Raise ReaderError when a float array holds NaN or Inf (never silently clipped)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    (bad,) = _compute((~_isfinite(array)).sum())
    if bad:
        raise ReaderError(path, f"contains {int(bad)} NaN/Inf pixel value(s); refusing to guess what they mean")


def _isfinite(array: np.ndarray | da.Array) -> np.ndarray | da.Array:
    if is_dask(array):
        import dask.array as da

        return da.isfinite(array)
    return np.isfinite(array)


def window_to_unit(
    array: np.ndarray | da.Array, lo: float, hi: float, *, invert: bool = False
) -> np.ndarray | da.Array:
    """Linearly map [lo, hi] to [0, 1] (clipped) as float32; ``invert`` flips it (MONOCHROME1).

    Same shape and kind (numpy or lazy dask) as ``array``; all zeros (ones if inverted) when hi <= lo.
    """
    width = float(hi) - float(lo)
    if not np.isfinite(width) or width <= 0:
        out = array.astype(np.float32) * np.float32(0)
    else:
        out = (array.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / width)
        out = out.clip(0.0, 1.0)
    if invert:
        out = np.float32(1.0) - out
    return out.astype(np.float32)


def raster_window(array: np.ndarray | da.Array) -> tuple[float, float, str, list[str], tuple[float, float]]:
    """Choose (lo, hi, window_source, notes, original_range) for a non-DICOM raster.

    See the module docstring for the rule. TypeError for a dtype that is not bool, integer or float.
    """
    dtype = array.dtype
    notes: list[str] = []
    if dtype == np.bool_:
        return 0.0, 1.0, "dtype_range", notes, min_max(array.astype(np.uint8))
    data_lo, data_hi = min_max(array)
    rng = (data_lo, data_hi)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if info.bits == 8:
            return float(info.min), float(info.max), "dtype_range", notes, rng
        if dtype == np.uint16 and data_hi >= 2**15:
            return 0.0, 65535.0, "dtype_range", notes, rng
        if dtype == np.uint16:
            bits = max(int(data_hi).bit_length(), 1)
            notes.append(f"16-bit image uses only {bits} bits; windowed by its min..max")
    elif np.issubdtype(dtype, np.floating):
        if data_lo >= 0.0 and data_hi <= 1.0:
            return 0.0, 1.0, "dtype_range", notes, rng
    else:
        raise TypeError(f"unsupported pixel dtype {dtype}")
    if data_hi <= data_lo:
        notes.append(f"constant image (every pixel = {data_lo:g}); returned as zeros")
    return data_lo, data_hi, "minmax", notes, rng


def percentile_window(
    array: np.ndarray | da.Array, low: float = PERCENTILES[0], high: float = PERCENTILES[1]
) -> tuple[float, float]:
    """(lo, hi) at the given percentiles; subsampled on a regular grid for very large images."""
    step = 1
    n = int(np.prod(array.shape[:2]))
    if n > PERCENTILE_SAMPLE_PIXELS:
        step = int(np.ceil(np.sqrt(n / PERCENTILE_SAMPLE_PIXELS)))
    sample = array[::step, ::step]
    if is_dask(sample):
        sample = sample.compute()
    lo, hi = np.percentile(np.asarray(sample, dtype=np.float64), [low, high])
    return float(lo), float(hi)


def to_grey(array: np.ndarray | da.Array) -> tuple[np.ndarray | da.Array, str]:
    """Collapse (H, W, 3|4) colour to luminance; returns (grey, note).

    Alpha is dropped. Images whose colour channels are identical (greyscale
    saved as RGB, common for exported X-rays) take one channel unchanged so the
    original dtype range rule still applies.
    """
    rgb = array[..., :3]
    dropped_alpha = array.shape[-1] == 4
    same = _compute(((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all())[0]
    suffix = "; alpha channel dropped" if dropped_alpha else ""
    if same:
        return rgb[..., 0], "colour channels identical; used one channel as grey" + suffix
    w = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    grey = rgb[..., 0] * w[0] + rgb[..., 1] * w[1] + rgb[..., 2] * w[2]
    if np.issubdtype(array.dtype, np.integer):
        # Keep the stored dtype so the dtype-range rule keeps its meaning.
        grey = grey.round().astype(array.dtype)
    else:
        grey = grey.astype(np.float32)
    return grey, "converted RGB to grey (BT.709 luminance)" + suffix
