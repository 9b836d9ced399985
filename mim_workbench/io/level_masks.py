"""Region masks between pyramid levels: paint coarse, use at any resolution.

A region mask painted (or proposed) on a reduced level of a pyramid has fewer
pixels but covers the same physical extent as the image; napari shows it aligned
because its layer ``scale`` is that level's pixel size.  :func:`resample_mask`
maps such a mask onto any other grid by physical coordinates (nearest
neighbour: a pixel takes the mask value under its centre), so the same mask
drives crop selection at one level and patch masking at another.

Above :data:`~mim_workbench.io.meta.LAZY_THRESHOLD_PIXELS` target pixels the
result is a lazy dask array: a 30000² level-0 mask is never materialised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.io import meta as _meta

if TYPE_CHECKING:
    import dask.array as da
    import numpy.typing as npt


def _index_map(n_out: int, out_scale: float, n_in: int, in_scale: float, start: int = 0) -> np.ndarray:
    """Source index under the centre of output pixels ``start .. start + n_out``."""
    centres = (np.arange(start, start + n_out, dtype=np.float64) + 0.5) * out_scale
    return np.clip(np.floor(centres / in_scale).astype(np.int64), 0, n_in - 1)


def resample_mask(mask: npt.ArrayLike, shape: tuple[int, int], *, mask_scale: tuple[float, float] | None = None,
                  scale: tuple[float, float] | None = None, lazy: bool | None = None) -> np.ndarray | da.Array:
    """``mask`` (H, W) -> uint8 {0, 1} on a (h, w) = ``shape`` grid covering the same extent.

    Nonzero counts as 1; an (H, W, C) mask uses its first channel.

    ``mask_scale`` and ``scale`` are the pixel sizes (any unit, e.g. the napari
    layer scales) of the mask and of the target; when either is missing the two
    grids are assumed to span the same extent (scale ratio = shape ratio).
    ``lazy`` forces (or forbids) a dask result; by default large targets are lazy.
    """
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = (m > 0).astype(np.uint8)
    H, W = (int(s) for s in shape)
    if mask_scale is None or scale is None:
        mask_scale, scale = (1.0 / m.shape[0], 1.0 / m.shape[1]), (1.0 / H, 1.0 / W)
    if lazy is None:
        lazy = _meta.is_large((H, W))
    if not lazy:
        rows = _index_map(H, scale[0], m.shape[0], mask_scale[0])
        cols = _index_map(W, scale[1], m.shape[1], mask_scale[1])
        return m[rows[:, None], cols[None, :]]
    import dask.array as da

    def block(block_info: dict | None = None) -> np.ndarray:
        """The uint8 output chunk at dask's ``array-location`` (rows, cols) of the target grid."""
        loc = block_info[None]["array-location"]
        (r0, r1), (c0, c1) = loc
        rows = _index_map(r1 - r0, scale[0], m.shape[0], mask_scale[0], r0)
        cols = _index_map(c1 - c0, scale[1], m.shape[1], mask_scale[1], c0)
        return m[rows[:, None], cols[None, :]]

    return da.map_blocks(block, dtype=np.uint8, chunks=da.core.normalize_chunks((2048, 2048), (H, W)))


def mask_window(mask: np.ndarray, mask_scale: tuple[float, float], rows: tuple[int, int],
                cols: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """The part of ``mask`` under the window ``[r0:r1, c0:c1]`` of a grid of pixel size ``scale``.

    Zero outside the mask.  Used to cut the region of one crop or tile without
    resampling the whole mask to that level.
    """
    (r0, r1), (c0, c1) = rows, cols
    m = np.asarray(mask)
    rc = (np.arange(r0, r1, dtype=np.float64) + 0.5) * scale[0] / mask_scale[0]
    cc = (np.arange(c0, c1, dtype=np.float64) + 0.5) * scale[1] / mask_scale[1]
    ri, ci = np.floor(rc).astype(np.int64), np.floor(cc).astype(np.int64)
    rok = (ri >= 0) & (ri < m.shape[0])
    cok = (ci >= 0) & (ci < m.shape[1])
    out = m[np.clip(ri, 0, m.shape[0] - 1)[:, None], np.clip(ci, 0, m.shape[1] - 1)[None, :]] > 0
    return (out & rok[:, None] & cok[None, :]).astype(np.uint8)
