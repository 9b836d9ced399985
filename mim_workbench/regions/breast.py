"""Breast region on mammograms (CC or MLO), without background and burned-in
labels, optionally without the pectoral muscle.

Method, at a working size (longest side ``work_size``, default 512 px):

1. Robust normalisation (0.5/99.5 percentiles).
2. Foreground threshold between the background level (the median of the
   pixels below Otsu's threshold) and Otsu's threshold, closer to the
   background (``level``), so the faint fatty skin-line region is kept.
3. Opening breaks thin bridges (film edges, label tape); the breast is the
   largest component; burned-in labels, film-edge strips and markers are
   other components and are dropped. Holes are filled and the boundary
   smoothed.
4. Optional pectoral exclusion (MLO): the chest-wall side is the side of the
   breast's bounding box with the longer straight edge (films often have
   black margins, so not the image border). Working in that box with the
   chest wall on the left, the muscle is a bright triangle in the upper
   chest-wall corner. Every straight line from the top edge to the
   chest-wall edge on a grid is scored by the contrast across it (mean of a
   band inside the triangle minus a band outside, within the breast); the best
   line is accepted when the contrast is clear and the triangle is brighter
   than the breast below it, and the triangle is removed.

Measured (``benchmarks/bench_regions.py``): Dice 0.998 against the MG phantom's
outline (label block excluded), 0.996 against outline minus pectoral with
``exclude_pectoral``; mini-MIAS: one component on all 160 films. The pectoral
line is a straight-line approximation and can be too shallow on faint muscles.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mim_workbench.errors import ConfigError
from mim_workbench.regions import morphology as M

WORK_SIZE = 512


def normalize(g: np.ndarray) -> np.ndarray:
    """``g`` stretched so its 0.5-99.5 % percentiles span [0, 1], clipped, float32; zeros when flat."""
    lo, hi = np.percentile(g, [0.5, 99.5])
    if hi - lo < 1e-6:
        return np.zeros_like(g)
    return np.clip((g - lo) / (hi - lo), 0, 1).astype(np.float32)


def foreground(g: np.ndarray, level: float) -> tuple[np.ndarray, float]:
    """Thresholded foreground and the threshold used."""
    t_otsu = M.otsu(g)
    low = g[g < t_otsu]
    bg = float(np.median(low)) if low.size else 0.0
    t = bg + level * (t_otsu - bg)
    return g > t, t


def chest_wall_side(breast: np.ndarray) -> str:
    """'left' or 'right': the side of the breast's bounding box with the longer edge.

    The chest wall is a long straight cut through the breast; the nipple side
    tapers. Measured on the bounding box, not the image border, because films
    are often digitised with black margins (mini-MIAS).
    """
    cols = np.flatnonzero(breast.any(0))
    if cols.size == 0:
        return "left"
    c0, c1 = int(cols[0]), int(cols[-1])
    k = max(1, int(0.05 * (c1 - c0 + 1)))
    left = int(breast[:, c0 : c0 + k].sum())
    right = int(breast[:, c1 - k + 1 : c1 + 1].sum())
    return "left" if left >= right else "right"


def breast_component(fg: np.ndarray, open_radius: int) -> np.ndarray:
    """Largest component of the opened foreground (labels and film strips are smaller)."""
    return M.largest_components(M.open_(fg, open_radius), 1)


def pectoral_triangle(g: np.ndarray, breast: np.ndarray, *, min_contrast: float = 0.06
                      ) -> np.ndarray | None:
    """Triangle mask of the pectoral muscle (chest wall on the left), or None.

    Lines run from (row 0, col a) to (row b, col 0); scored on a 128-px copy.
    """
    h, w = g.shape
    s = 128 / max(h, w)
    hs, ws = max(8, round(h * s)), max(8, round(w * s))
    gs = M.resize(g, (hs, ws))
    bs = M.resize(breast.astype(np.float32), (hs, ws)) >= 0.5
    if bs.sum() < 50:
        return None
    cols = np.flatnonzero(bs.any(0))
    rows = np.flatnonzero(bs.any(1))
    bw = cols[-1] + 1
    bh = rows[-1] + 1
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32) + 0.5
    band = 5.0
    # film-edge strips along the top border are not muscle
    usable = bs & (yy > 0.03 * hs)
    best: tuple[float, float, float] | None = None
    for a in np.linspace(0.12, 0.75, 16) * bw:
        for b in np.linspace(0.15, 0.98, 22) * bh:
            # signed distance to the line x/a + y/b = 1 (negative inside the triangle)
            dist = (xx / a + yy / b - 1.0) / np.hypot(1 / a, 1 / b)
            inside = (dist < 0) & (dist > -band) & usable
            outside = (dist > 0) & (dist < band) & usable
            ni, no = int(inside.sum()), int(outside.sum())
            if ni < 20 or no < 20:
                continue
            # contrast across the line, discounted for short (noisy) lines
            c = float(gs[inside].mean() - gs[outside].mean()) - 0.3 / np.sqrt(min(ni, no))
            if best is None or c > best[0]:
                best = (c, a, b)
    if best is None or best[0] < min_contrast:
        return None
    c, a, b = best
    tri_s = (xx / a + yy / b) < 1.0
    tri_in = tri_s & bs
    below = bs & ~tri_s & (yy < 2 * b)
    if tri_in.sum() < 8 or below.sum() < 8 or gs[tri_in].mean() <= gs[below].mean():
        return None
    if tri_in.sum() > 0.5 * bs.sum():
        return None
    yy_f, xx_f = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return (xx_f / (a / s) + yy_f / (b / s)) < 1.0


def propose_breast(image: np.ndarray, *, work_size: int = WORK_SIZE, level: float = 0.35,
                   exclude_pectoral: bool = False, side: str = "auto", open_radius: int = 3,
                   smooth: float = 2.0, **unknown: Any) -> np.ndarray:
    """Breast region of a mammogram, uint8 {0, 1} at the image's H×W.

    Options: ``work_size`` (longest side processed, px), ``level`` (threshold
    position between background (0) and Otsu (1)), ``exclude_pectoral``
    (remove the pectoral muscle on MLO views), ``side`` ("auto", "left",
    "right": the chest-wall side), ``open_radius`` (working px; breaks
    bridges to labels / film edges), ``smooth`` (boundary smoothing, working px).
    """
    if unknown:
        raise ConfigError(f"preset 'breast': unknown option(s) {sorted(unknown)}; valid: work_size, level, "
                          "exclude_pectoral, side, open_radius, smooth")
    if side not in ("auto", "left", "right"):
        raise ConfigError(f"preset 'breast': side must be 'auto', 'left' or 'right', got {side!r}")
    img = M.check_gray(M.as_array(image, max_side=work_size), "breast")
    H, W = int(image.shape[0]), int(image.shape[1])  # output grid: the caller's, not the strided copy
    if min(H, W) < 8:
        return np.zeros((H, W), np.uint8)
    g = normalize(M.downsample(img, work_size))
    fg, _ = foreground(ndi.gaussian_filter(g, 1.0), level)
    breast = breast_component(fg, open_radius)
    if not breast.any():
        return np.zeros((H, W), np.uint8)
    breast = M.fill_holes(M.close_(breast, open_radius))
    if exclude_pectoral:
        wall = chest_wall_side(breast) if side == "auto" else side
        # work in the breast's bounding box with the chest wall on the left
        rows = np.flatnonzero(breast.any(1))
        cols = np.flatnonzero(breast.any(0))
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        gb, bb = g[box], breast[box]
        if wall == "right":
            gb, bb = gb[:, ::-1], bb[:, ::-1]
        tri = pectoral_triangle(gb, bb)
        if tri is not None:
            if wall == "right":
                tri = tri[:, ::-1]
            cut = np.zeros_like(breast)
            cut[box] = tri
            breast = M.largest_components(breast & ~cut, 1)
    breast = M.smooth_mask(breast, smooth)
    return M.upsample_mask(breast, (H, W))
