"""Teeth on panoramic dental X-rays (orthopantomograms).

Teeth (enamel crowns, dentine, restorations) are the brightest structures of the
central band of a panoramic film. At a working size (longest side 512 px):

1. Robust normalisation, then local background subtraction (image minus a
   wide Gaussian), so the jaw bone and soft-tissue shadows flatten out and the
   teeth stand out by local contrast.
2. A soft central-band prior (the dental arch occupies roughly the middle
   60 % of the rows and 75 % of the columns on a panoramic) weights the
   contrast image; Otsu's threshold inside the band separates teeth.
3. Morphology: opening removes trabecular speckle, the surviving components
   that lie in the band and are large enough are kept, a closing joins
   neighbouring teeth and the occlusal gap into arch-shaped regions, holes
   (pulp, caries, which are dark) are filled and the boundary smoothed and
   grown by ``grow`` px so crown edges are inside.

Measured on the 100 DC1000 panoramics (``benchmarks/bench_regions.py``): mean
caries-pixel recall 0.94 (median 1.0), 97 % of caries lesions mostly inside,
region ≈ 19 % of the film. Bone next to the teeth and the maxillary
sinus floor sometimes leak in; it is a starting point for painting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mim_workbench.errors import ConfigError
from mim_workbench.regions import morphology as M

WORK_SIZE = 512
TOOTH_WIDTH = 25
DENSITY_SIGMA = 6.0
BRIGHT_PERCENTILE = 97.0
#: threshold sits this fraction of the density range below Otsu's (tuned for caries recall)
THRESHOLD_SHIFT = 0.05
#: central band of a panoramic (fractions of height / width) where teeth are
BAND_ROWS = (0.25, 0.82)
BAND_COLS = (0.12, 0.88)


def band_prior(shape: tuple[int, int], rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    """Soft (super-elliptical) weight: 1 in the band centre, falling to 0 outside."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, ry = (rows[0] + rows[1]) / 2 * h, (rows[1] - rows[0]) / 2 * h
    cx, rx = (cols[0] + cols[1]) / 2 * w, (cols[1] - cols[0]) / 2 * w
    r = (np.abs(yy - cy) / ry) ** 4 + (np.abs(xx - cx) / rx) ** 4
    return np.clip(1.5 - r, 0, 1).astype(np.float32)


def propose_teeth(image: np.ndarray, *, work_size: int = WORK_SIZE, sensitivity: float = 0.0,
                  close_radius: int = 8, grow: int = 2, smooth: float = 1.5,
                  band_rows: tuple[float, float] = BAND_ROWS, band_cols: tuple[float, float] = BAND_COLS,
                  **unknown: Any) -> np.ndarray:
    """Teeth region of a panoramic dental X-ray, uint8 {0, 1} at the image's H×W.

    Options: ``work_size``, ``sensitivity`` (shifts the threshold: +0.1 takes
    more, −0.1 less, in units of the contrast range), ``close_radius`` (joins
    teeth, working px), ``grow`` (final dilation, working px), ``smooth``,
    ``band_rows`` / ``band_cols`` (where the teeth are, as fractions).
    """
    if unknown:
        raise ConfigError(f"preset 'teeth': unknown option(s) {sorted(unknown)}; valid: work_size, sensitivity, "
                          "close_radius, grow, smooth, band_rows, band_cols")
    img = M.check_gray(M.as_array(image, max_side=work_size), "teeth")
    H, W = int(image.shape[0]), int(image.shape[1])  # output grid: the caller's, not the strided copy
    if min(H, W) < 8:
        return np.zeros((H, W), np.uint8)
    g = M.downsample(img, work_size)
    lo, hi = np.percentile(g, [1, 99.5])
    g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    scale = max(g.shape) / 512.0
    g = ndi.gaussian_filter(g, 1.0 * scale)
    # teeth are bright vertical structures narrower than TOOTH_WIDTH: a horizontal
    # white top-hat keeps them and drops the jaw bone and soft-tissue shadows
    length = max(3, round(TOOTH_WIDTH * scale)) | 1
    tophat = g - ndi.grey_opening(g, size=(1, length))
    density = ndi.gaussian_filter(tophat, DENSITY_SIGMA * scale)
    prior = band_prior(g.shape, band_rows, band_cols)
    inband = prior > 0.5
    vals = density[inband]
    if vals.size < 50:
        return np.zeros((H, W), np.uint8)
    crange = float(np.percentile(vals, 99) - np.percentile(vals, 1))
    t = M.otsu(vals) - (THRESHOLD_SHIFT + sensitivity) * crange
    # restorations / crowns wider than a tooth survive as plain very bright pixels
    bright = g > np.percentile(g[inband], BRIGHT_PERCENTILE)
    mask = ((density > t) | M.open_(bright, max(1, round(2 * scale)))) & (prior > 0)
    mask = M.open_(mask, max(1, round(1 * scale)))
    lab, n = M.label(mask)
    if n == 0:
        return np.zeros((H, W), np.uint8)
    sizes = np.bincount(lab.ravel())
    weight = ndi.mean(prior, lab, index=np.arange(n + 1))
    keep = (sizes >= 0.0005 * g.size) & (np.asarray(weight) > 0.6)
    keep[0] = False
    mask = keep[lab]
    mask = M.close_(mask, max(1, round(close_radius * scale)))
    mask = M.fill_holes(mask)
    mask = M.largest_components(mask, 4, min_fraction=0.08)
    if grow > 0:
        mask = ndi.binary_dilation(mask, structure=M.disk(max(1, round(grow * scale))))
    mask = M.smooth_mask(mask, smooth)
    return M.upsample_mask(mask, (H, W))
