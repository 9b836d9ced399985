"""napari writer for region masks (Labels layers): PNG/TIFF as 0/255, .npy keeps label values."""

from __future__ import annotations

from typing import Any

import numpy as np

from mim_workbench.io.mask_writer import save_mask


def write_region_mask(path: str, data: Any, meta: dict) -> list[str]:
    return [str(save_mask(path, np.asarray(data)))]
