"""Search an embedding index by a region: the images holding something like what a box shows.

The box's patch features (the cells of the encoder's patch grid it covers, averaged) are
compared with every window of the same size on every indexed image's stored patch grid
(``patches.npy``, :mod:`.embed`); an image's distance is 1 − the best window's cosine
similarity, and that window, mapped back to the image's pixels, says where the match is.
Boxes are ``(top, left, bottom, right)`` in pixels of their image, bottom/right exclusive.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

if TYPE_CHECKING:
    from .embed import EmbeddingIndex
    from .reconstruct import ImageLike

Box = tuple[int, int, int, int]


def check_box(box: tuple[float, ...], shape: tuple[int, ...]) -> Box:
    """``box`` as whole pixels clipped to an image of ``shape`` (H, W, ...); ConfigError when it
    is not four numbers, is empty, or lies outside the image."""
    if len(box) != 4:
        raise ConfigError(f"box {tuple(box)}: give four numbers, top, left, bottom, right (pixels)")
    h, w = int(shape[0]), int(shape[1])
    top, left, bottom, right = (float(v) for v in box)
    if bottom <= top or right <= left:
        raise ConfigError(f"box {tuple(box)}: bottom must be below top and right beyond left")
    if bottom <= 0 or right <= 0 or top >= h or left >= w:
        raise ConfigError(f"box {tuple(box)} lies outside the image ({h}×{w} pixels)")
    clipped = (max(0, math.floor(top)), max(0, math.floor(left)), min(h, math.ceil(bottom)), min(w, math.ceil(right)))
    return clipped  # type: ignore[return-value]


def box_cells(box: Box, source: tuple[int, int], img_size: tuple[int, int],
              grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """The patch-grid cells ``(r0, c0, r1, c1)`` (exclusive ends, at least one cell) that a
    pixel box of an image of size ``source`` covers once letterboxed into ``img_size``."""
    k = min(img_size[0] / source[0], img_size[1] / source[1])      # top-left letterbox: a pure scale
    ch, cw = img_size[0] / grid[0], img_size[1] / grid[1]
    r0, c0 = int(box[0] * k // ch), int(box[1] * k // cw)
    r1, c1 = math.ceil(box[2] * k / ch), math.ceil(box[3] * k / cw)
    r0, c0 = min(r0, grid[0] - 1), min(c0, grid[1] - 1)
    return r0, c0, max(r0 + 1, min(r1, grid[0])), max(c0 + 1, min(c1, grid[1]))


def cells_box(cells: tuple[int, int, int, int], source: tuple[int, int], img_size: tuple[int, int],
              grid: tuple[int, int]) -> Box:
    """Inverse of :func:`box_cells`: grid cells -> a pixel box of the source image (clipped to it)."""
    k = min(img_size[0] / source[0], img_size[1] / source[1])
    ch, cw = img_size[0] / grid[0], img_size[1] / grid[1]
    r0, c0, r1, c1 = cells
    return (min(source[0] - 1, int(r0 * ch / k)), min(source[1] - 1, int(c0 * cw / k)),
            min(source[0], math.ceil(r1 * ch / k)), min(source[1], math.ceil(c1 * cw / k)))


def similar_region(index: EmbeddingIndex, image: ImageLike, box: tuple[float, ...], *, k: int = 8,
                   exclude_same_patient: bool = False, device: str | torch.device = "cpu",
                   chunk: int = 256) -> list[dict[str, Any]]:
    """The ``k`` images of ``index`` with the window most like ``box`` of ``image``, nearest first:
    ``path``, ``distance`` (1 − cosine), ``label`` and ``box`` (where in that image, pixels).
    ConfigError for an index without patch features (embed again) or a box outside the image."""
    from .embed import _own_row
    from .explain import bounded

    if index.patches is None or index.img_size is None or any(r.get("size") is None for r in index.rows):
        raise ConfigError(f"{index.root}: this index holds no patch features; run mim-workbench embed again")
    pixels, factor = bounded(image)         # a large image: reduced, and the box with it
    full = (round(pixels.shape[0] * factor), round(pixels.shape[1] * factor))
    box = tuple(v / factor for v in check_box(box, full))
    grid = tuple(index.patches.shape[-2:])
    query_grid = torch.from_numpy(index.embedder(device).encode([pixels])[1])
    if tuple(query_grid.shape[-2:]) != grid:
        raise ConfigError(f"{index.root}: its patch grid {grid} is not the checkpoint's; run mim-workbench embed again")
    r0, c0, r1, c1 = box_cells(box, pixels.shape[:2], index.img_size, grid)
    query = F.normalize(query_grid[0, :, r0:r1, c0:c1].mean((1, 2)), dim=0)
    best, where = _best_windows(index, query, (r1 - r0, c1 - c0), chunk)
    own = _own_row(index, image)
    patient = index.rows[own].get("patient") if own is not None else None
    out: list[dict[str, Any]] = []
    for i in np.argsort(-best, kind="stable"):
        row = index.rows[i]
        if exclude_same_patient and patient is not None and i != own and row.get("patient") == patient:
            continue
        r, c = divmod(int(where[i]), grid[1] - (c1 - c0) + 1)
        found = cells_box((r, c, r + r1 - r0, c + c1 - c0), tuple(row["size"]), index.img_size, grid)
        out.append({"path": row["path"], "distance": float(max(1.0 - best[i], 0.0)), "label": row.get("label"),
                    "box": list(found)})
        if len(out) == k:
            break
    return out


def _best_windows(index: EmbeddingIndex, query: torch.Tensor, window: tuple[int, int],
                  chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Per indexed image: the best window's cosine similarity with ``query`` and its flat position."""
    best, where = [], []
    for start in range(0, len(index.rows), chunk):
        grids = torch.from_numpy(np.asarray(index.patches[start:start + chunk], dtype=np.float32))
        pooled = F.normalize(F.avg_pool2d(grids, window, stride=1), dim=1)        # [n, D, h', w']
        sims = torch.einsum("ndhw,d->nhw", pooled, query).flatten(1)
        sims = sims.masked_fill(~_inside(index, start, len(grids), window, grids.shape[-2:]), -2.0)
        value, pos = sims.max(1)
        best.append(value.numpy())
        where.append(pos.numpy())
    return np.concatenate(best), np.concatenate(where)


def _inside(index: EmbeddingIndex, start: int, n: int, window: tuple[int, int],
            grid: tuple[int, int]) -> torch.Tensor:
    """``[n, positions]``: windows that start on the image rather than on the letterbox padding."""
    h, w = grid[0] - window[0] + 1, grid[1] - window[1] + 1
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    masks = []
    for row in index.rows[start:start + n]:
        rh, rw = row["size"]
        k = min(index.img_size[0] / rh, index.img_size[1] / rw)
        gh = max(1, math.ceil(rh * k / (index.img_size[0] / grid[0])) - window[0] + 1)
        gw = max(1, math.ceil(rw * k / (index.img_size[1] / grid[1])) - window[1] + 1)
        masks.append(((rows < gh) & (cols < gw)).flatten())
    return torch.stack(masks)


__all__ = ["Box", "box_cells", "cells_box", "check_box", "similar_region"]
