"""napari writer for region masks (Labels layers): PNG/TIFF as 0/255, .npy keeps label values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.io.mask_writer import save_mask

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def write_region_mask(path: str, data: ArrayLike, meta: dict) -> list[str]:
    """napari writer hook: save a Labels layer's 2-D ``data`` to ``path`` (PNG/TIFF as 0/255 uint8, ``.npy``
    with its label values, written atomically); returns ``[path]``. ``meta`` is unused. Raises ReaderError
    for another extension or data that is not 2-D."""
    return [str(save_mask(path, np.asarray(data)))]
