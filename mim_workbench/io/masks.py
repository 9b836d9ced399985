"""Region masks: stored values -> uint8 {0, 1}, resampled to the image grid.

Value rule (why: public sets encode masks differently, and a wrong rule silently
turns an "ignore" label into lung):

1. Values only in {0, 1} (or bool): used as they are.
2. Values only in {0, 127, 255} (the 0/255 convention, plus V7 Darwin's 127 =
   "Ignore" for devices and markup): ``value > 127`` is region, so 255 -> 1 and
   127 -> 0.
3. Other label images with at most :data:`MAX_LABEL_VALUES` distinct values
   (e.g. 0/102/153/255 severity levels, or 0/1/2 class ids): every nonzero value
   is region.
4. Anything else (many distinct values: anti-aliased or JPEG-compressed masks)
   is thresholded at half the dtype range: ``> 127`` for 8-bit, ``> 32767`` for
   16-bit, ``> 0.5`` for floats in [0, 1], otherwise above the midpoint of min..max.

Colour masks are reduced to their per-pixel maximum channel first.

Resampling: when a target ``shape`` is given and differs, the mask is resized
with nearest neighbour (the COVID-19 Radiography Database pairs 299 px images
with 256 px masks). If the aspect ratios differ by more than
:data:`MAX_ASPECT_MISMATCH` (2 %) the mask belongs to a different image geometry
and a ReaderError naming both shapes is raised instead of stretching it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io import dicom as _dicom
from mim_workbench.io import raster as _raster
from mim_workbench.io.arrays import as_2d, shape_str
from mim_workbench.io.formats import sniff
from mim_workbench.io.meta import is_dask

if TYPE_CHECKING:
    import dask.array as da

MAX_LABEL_VALUES = 16
MAX_ASPECT_MISMATCH = 0.02


def binarize(values: np.ndarray | da.Array, path: str | Path = "<array>") -> np.ndarray:
    """Apply the value rule of the module docstring; returns (H, W) uint8 {0, 1} in memory.

    ReaderError naming ``path`` for a shape or dtype that is not a 2-D mask, or NaN/Inf values.
    """
    arr = np.asarray(values.compute() if is_dask(values) else values)
    arr = as_2d(arr, str(path), what="mask")
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ReaderError(path, "mask contains NaN/Inf values")
    if arr.dtype == np.uint8:  # fast path for the common case
        uniq = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    else:
        uniq = np.unique(arr)
    if len(uniq) > MAX_LABEL_VALUES + 1:
        uniq = None  # many values: continuous, rule 4
    if uniq is not None:
        vals = set(uniq.tolist())
        if vals <= {0, 1}:
            return (arr != 0).astype(np.uint8)
        if vals <= {0, 127, 255}:
            return (arr > 127).astype(np.uint8)
        if len(vals) <= MAX_LABEL_VALUES:
            return (arr != 0).astype(np.uint8)
    if arr.dtype.kind == "u":
        threshold: float = float(np.iinfo(arr.dtype).max // 2)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        threshold = 0.5 if (arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0) else (lo + hi) / 2.0
    return (arr > threshold).astype(np.uint8)


def check_aspect(mask_shape: tuple[int, int], shape: tuple[int, int], path: str | Path) -> None:
    """ReaderError when the mask's aspect ratio is not the image's (beyond 2 %)."""
    (h, w), (th, tw) = mask_shape, shape
    ratio = (h / w) / (th / tw)
    if abs(ratio - 1.0) > MAX_ASPECT_MISMATCH:
        raise ReaderError(
            path,
            f"mask shape {shape_str(mask_shape)} does not match image shape {shape_str(shape)} "
            f"(aspect ratios differ by {abs(ratio - 1.0) * 100:.1f} %)",
        )


def resample_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a {0, 1} mask (no smoothing, values kept)."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    from skimage.transform import resize

    out = resize(mask, shape, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
    return out.astype(np.uint8)


def read_mask(path: str | Path, *, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a region mask as uint8 {0, 1}, nearest-resampled to ``shape`` when given.

    Sources: PNG, JPEG, TIFF, zarr, npy, DICOM SEG (and plain DICOM via the value rule).
    Any failure is one ReaderError naming the file (a fuzzed DICOM once leaked a ValueError).
    """
    from mim_workbench.io.readers import guarded

    p = Path(path)
    return guarded(p, lambda: _read_mask(p, shape))


def _read_mask(p: Path, shape: tuple[int, int] | None) -> np.ndarray:
    fmt, _notes = sniff(p)
    if fmt == "dicom":
        ds = _dicom.load(p)
        mask = _dicom.seg_mask(ds, p) if _dicom.is_segmentation(ds) else binarize(_dicom.dicom_raw_mask(p, ds), p)
    else:
        decoders = {
            "png": lambda: _raster.decode_pil(p, "png"),
            "jpeg": lambda: _raster.decode_pil(p, "jpeg"),
            "tiff": lambda: _raster.decode_tiff(p),
            "npy": lambda: _raster.decode_npy(p),
            "zarr": lambda: _raster.decode_zarr(p),
        }
        mask = binarize(decoders[fmt]().array, p)
    if shape is not None:
        target = (int(shape[0]), int(shape[1]))
        if tuple(mask.shape) != target:
            check_aspect(tuple(mask.shape), target, p)
            mask = resample_nearest(mask, target)
    return np.ascontiguousarray(mask, dtype=np.uint8)
