"""Shared helpers for region proposal: working-size resampling, component
selection and boundary smoothing. Pure numpy / scipy / PIL (fast C resizers),
no GUI imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from mim_workbench.errors import ConfigError

if TYPE_CHECKING:
    import dask.array as da


def as_array(image: np.ndarray | da.Array, *, max_side: int | None = None) -> np.ndarray:
    """``image`` as a float32 numpy array, ints scaled to [0, 1] (uint8 by 255,
    wider types by their maximum).

    With ``max_side``, an image much larger than that (numpy or dask) is first
    subsampled by an integer stride so that about 2×``max_side`` pixels per side
    remain: proposal never needs the full resolution, a 5000 px mammogram is
    not converted to float whole, and a lazy gigapixel array is not loaded.
    NaN and -Inf become 0, +Inf 1; ConfigError for a non-numeric dtype.
    """
    shape = getattr(image, "shape", ())
    if max_side is not None and len(shape) >= 2:
        step = max(1, int(max(shape[0], shape[1]) // (2 * max_side)))
        if step > 1:
            image = image[::step, ::step]
    if hasattr(image, "compute") and not isinstance(image, np.ndarray):
        image = image.compute()
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    if arr.dtype.kind not in "fiu":
        raise ConfigError(f"image: expected a numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        scale = 255.0 if arr.dtype == np.uint8 else float(max(1, arr.max()))
        arr = arr.astype(np.float32) / scale
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return arr


def check_gray(arr: np.ndarray, preset: str) -> np.ndarray:
    """2-D grey image; an RGB(A) image is reduced to its luminance."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ConfigError(f"preset {preset!r}: expected a 2-D image (H, W) or (H, W, 3), got shape {arr.shape}")
    return arr


def work_size(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) scaled so the longest side is ``max_side`` (never upscaled, ≥ 1)."""
    h, w = int(shape[0]), int(shape[1])
    f = min(1.0, max_side / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def resize(arr: np.ndarray, size: tuple[int, int], *, order: int = 1) -> np.ndarray:
    """Resize a 2-D float array to ``size`` = (h, w) with PIL's C resizers.

    Downsampling uses an area (box) filter so no aliasing; upsampling is
    bilinear (``order=1``) or nearest (``order=0``).
    """
    h, w = size
    if arr.shape == (h, w):
        return arr.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    if order == 0:
        resample = Image.Resampling.NEAREST
    elif h <= arr.shape[0] and w <= arr.shape[1]:
        resample = Image.Resampling.BOX
    else:
        resample = Image.Resampling.BILINEAR
    return np.asarray(img.resize((w, h), resample=resample), dtype=np.float32)


def downsample(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Grey (H, W) or colour (H, W, C) image shrunk so its longest side is ``max_side``."""
    size = work_size(arr.shape[:2], max_side)
    if arr.ndim == 2:
        return resize(arr, size)
    return np.stack([resize(arr[..., c], size) for c in range(arr.shape[-1])], axis=-1)


def upsample_mask(mask: np.ndarray, shape: tuple[int, int], *, smooth: float = 0.6) -> np.ndarray:
    """Working-size binary mask -> uint8 {0, 1} at ``shape`` with a smooth boundary.

    The mask is lightly blurred, resized bilinearly and thresholded at 0.5, so
    the staircase of a nearest-neighbour upsampling does not appear.
    """
    m = mask.astype(np.float32)
    if smooth > 0 and min(m.shape) > 4:
        m = ndi.gaussian_filter(m, smooth, mode="nearest")
    if m.shape != tuple(shape):
        m = resize(m, (int(shape[0]), int(shape[1])), order=1)
    return (m >= 0.5).astype(np.uint8)


def smooth_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed boundary (blur, threshold at 0.5)."""
    if sigma <= 0 or not mask.any():
        return mask.astype(bool)
    return ndi.gaussian_filter(mask.astype(np.float32), sigma, mode="nearest") >= 0.5


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element, (2r + 1, 2r + 1) for ``radius`` r pixels (r < 0 counts as 0)."""
    r = max(0, int(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= r * r + r * 0.5


def open_(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening with a disk of ``radius`` pixels, as bool (``mask`` unchanged when ``radius`` <= 0)."""
    if radius <= 0:
        return mask.astype(bool)
    return ndi.binary_opening(mask, structure=disk(radius))


def close_(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing that does not shrink at the image border (padded first)."""
    if radius <= 0:
        return mask.astype(bool)
    p = radius + 1
    padded = np.pad(mask.astype(bool), p, mode="edge")
    return ndi.binary_closing(padded, structure=disk(radius))[p:-p, p:-p]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` as bool with every enclosed hole filled."""
    return ndi.binary_fill_holes(mask)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(int labels, count) of the 4-connected components of ``mask``; background is 0, components 1..count."""
    lab, n = ndi.label(mask)
    return lab, int(n)


def largest_components(mask: np.ndarray, k: int = 1, *, min_fraction: float = 0.0) -> np.ndarray:
    """The ``k`` largest connected components (those ≥ ``min_fraction`` of the largest)."""
    lab, n = label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:k]
    keep = [i + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(lab, keep)


def touching_border(mask: np.ndarray, sides: str = "tblr") -> np.ndarray:
    """Components of ``mask`` that touch any of the given image sides."""
    lab, n = label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    ids: set[int] = set()
    if "t" in sides:
        ids |= set(np.unique(lab[0]).tolist())
    if "b" in sides:
        ids |= set(np.unique(lab[-1]).tolist())
    if "l" in sides:
        ids |= set(np.unique(lab[:, 0]).tolist())
    if "r" in sides:
        ids |= set(np.unique(lab[:, -1]).tolist())
    ids.discard(0)
    return np.isin(lab, sorted(ids))


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a 1-D sample (histogram based, fast)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return 0.5
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-8:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))]) if len(between) > 1 else float(centers[0])


def dice(a: np.ndarray, b: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty).

    Pixels where ``ignore`` is true are left out of both masks.
    """
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    if ignore is not None:
        keep = ~np.asarray(ignore).astype(bool)
        a, b = a & keep, b & keep
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s
