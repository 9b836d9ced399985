"""Automatic regions for large images: propose at a low pyramid level, use at any level.

The presets already work at a reduced size (longest side 512-1024 px), so running
them on a 5000 px mammogram or a gigapixel slide only needs that reduced image --
which a pyramid has on disk.  :func:`propose_region_large` reads the finest level
whose longest side fits ``max_side`` (never the full image), proposes there, and
returns the mask *at that level* with its napari ``scale``: shown as a Labels layer
with that scale it lies exactly on the image, and
:func:`mim_workbench.io.level_masks.resample_mask` brings it to any other level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mim_workbench.io.pyramid import Pyramid, open_pyramid

#: Longest side of the level the presets run on.
DEFAULT_MAX_SIDE = 1024


@dataclass
class LevelMask:
    """A region mask on one pyramid level."""

    mask: np.ndarray                  # uint8 {0, 1}, (h, w) of ``level``
    level: int
    scale: tuple[float, float]        # napari scale of the mask (mm, or level-0 pixels)
    full_shape: tuple[int, int]       # level-0 (H, W) the mask covers

    def at_level(self, pyr: Pyramid, level: int, *, lazy: bool | None = None) -> Any:
        """The mask on ``level`` of ``pyr`` (dask when that level is large)."""
        from mim_workbench.io.level_masks import resample_mask

        return resample_mask(self.mask, pyr.level_shape(level), mask_scale=self.scale, scale=pyr.scale(level),
                             lazy=lazy)


def propose_region_large(image: Pyramid | str | os.PathLike, preset: str, *, max_side: int = DEFAULT_MAX_SIDE,
                         **options: Any) -> LevelMask:
    """Run a region preset (``breast``, ``tissue``, ...) on a low level of a large image.

    ``image`` is a :class:`Pyramid` or a path (opened as one; colour kept for
    ``tissue``).  ``options`` go to the preset, e.g. ``exclude_pectoral=True``.
    """
    from mim_workbench.regions import propose_region

    pyr = image if isinstance(image, Pyramid) else open_pyramid(image, keep_color=(preset == "tissue"))
    level = pyr.level_for_max_side(max_side)
    low = pyr.read_level(level)
    if low.ndim == 3 and preset != "tissue":
        low = low.mean(axis=-1)
    mask = propose_region(low, preset, **options)
    return LevelMask(mask=np.asarray(mask, dtype=np.uint8), level=level, scale=pyr.scale(level),
                     full_shape=pyr.shape)
