"""Images as the models take them: any image-like input as a float array in [0, 1], and its
channels arranged for a model's ``in_chans``. Used by reconstruction, prediction and the
dense head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.errors import ConfigError
from mim_workbench.io.meta import LoadedImage
from mim_workbench.io.readers import read_image

if TYPE_CHECKING:
    import dask.array as da


def as_unit_array(image: str | Path | LoadedImage | np.ndarray | da.Array) -> np.ndarray:
    """Path / LoadedImage / array -> float32 numpy (H, W) or (H, W, C) in [0, 1].

    Integers are divided by their dtype's maximum; an array still outside [0, 1] is min-max scaled.
    Raises :class:`ConfigError` for another number of axes or non-finite values, ReaderError for a bad file.
    """
    if isinstance(image, (str, Path)):
        image = read_image(image, keep_color=False)
    data = getattr(image, "data", image)
    arr = np.asarray(data.compute() if hasattr(data, "compute") else data)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ConfigError(f"image must be 2-D (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype.kind in "ui":
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    elif arr.dtype == bool:
        arr = arr.astype(np.float32)
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ConfigError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:  # a raw float array: map to [0, 1] (readers already window images)
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr


def to_channels(arr: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W[, C]) -> (in_chans, H, W): grey repeated, colour kept, or averaged to fit ``in_chans``."""
    if arr.ndim == 2:
        return np.repeat(arr[None], in_chans, axis=0)
    arr = arr[..., :3]
    if in_chans == 1:
        return arr.mean(axis=-1, keepdims=False)[None]
    if arr.shape[-1] == in_chans:
        return np.moveaxis(arr, -1, 0)
    return np.repeat(arr.mean(axis=-1)[None], in_chans, axis=0)
