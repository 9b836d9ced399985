"""Tissue on histopathology slides (or any bright-background image).

At a low level (longest side ``work_size``, default 1024 px): stained tissue is
saturated, glass is white and unsaturated. The saturation channel
(``(max − min) / max``) is thresholded with Otsu (never below
``min_saturation``, so an almost empty slide does not turn noise into tissue);
near-white and near-black pixels (glass, slide edges, scanner borders) are
excluded; small specks are removed, gaps closed and holes filled. A grey image
falls back to darkness (``1 − grey``) with Otsu.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mim_workbench.errors import ConfigError
from mim_workbench.regions import morphology as M

WORK_SIZE = 1024


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of an (H, W, 3) image: float32 (H, W), 0 where the pixel is black."""
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    return np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def propose_tissue(image: np.ndarray, *, work_size: int = WORK_SIZE, min_saturation: float = 0.05,
                   min_area: float = 0.0005, close_radius: int = 2, smooth: float = 1.0,
                   **unknown: Any) -> np.ndarray:
    """Tissue region of a slide (H×W×3, or grey H×W), uint8 {0, 1} at H×W.

    Options: ``work_size`` (longest side processed, px), ``min_saturation``
    (floor of the threshold), ``min_area`` (smallest kept piece, fraction of
    the image), ``close_radius`` (working px), ``smooth``.
    """
    if unknown:
        raise ConfigError(f"preset 'tissue': unknown option(s) {sorted(unknown)}; valid: work_size, min_saturation, "
                          "min_area, close_radius, smooth")
    arr = M.as_array(image, max_side=work_size)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ConfigError(f"preset 'tissue': expected (H, W, 3) or (H, W), got shape {arr.shape}")
    H, W = int(image.shape[0]), int(image.shape[1])  # output grid: the caller's, not the strided copy
    if min(H, W) < 4:
        return np.zeros((H, W), np.uint8)
    small = M.downsample(arr, work_size)
    if small.max() > 1.0 + 1e-3:  # 0..255 floats
        small = small / 255.0
    if small.ndim == 3:
        feat = ndi.gaussian_filter(saturation(small), 1.0)
        value = small.max(axis=-1)
        t = max(min_saturation, M.otsu(feat))
        mask = (feat > t) & (value > 0.08)
    else:
        feat = ndi.gaussian_filter(1.0 - small, 1.0)
        t = M.otsu(feat)
        mask = (feat > t) & (small > 0.02)
    if not mask.any():
        return np.zeros((H, W), np.uint8)
    mask = M.open_(mask, 1)
    mask = M.close_(mask, close_radius)
    mask = M.fill_holes(mask)
    lab, n = M.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= max(4, min_area * mask.size)
        keep[0] = False
        mask = keep[lab]
    mask = M.smooth_mask(mask, smooth)
    return M.upsample_mask(mask, (H, W))
