"""Examples for learning a region: images and their masks, read from a data set.

Masks pair with images by name, as everywhere (a ``--masks`` folder, or the data set's own
masks); a mask of another resolution with the image's aspect ratio is resampled
nearest-neighbour, as the readers do. Images without a mask are left out; a data set with no
usable example, an empty mask or a mask of another aspect ratio is refused, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mim_workbench.errors import ConfigError
from mim_workbench.io.datasets import discover
from mim_workbench.io.masks import read_mask
from mim_workbench.io.readers import read_image


def examples_from_data(data: str | Path, masks: str | Path | None = None
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """``(images, masks, names)`` of every image of ``data`` that has a mask: float images in
    [0, 1] and uint8 {0, 1} masks on the image's grid."""
    index = discover(data, masks=masks)
    pairs = [s for s in index.samples if s.mask is not None]
    if not pairs:
        where = f" in {masks}" if masks else ""
        raise ConfigError(f"{data}: no image has a mask{where} to learn from (masks pair with images by name)")
    images, out_masks, names = [], [], []
    for sample in pairs:
        image = np.asarray(read_image(sample.image).data, dtype=np.float32)
        mask = read_mask(sample.mask, shape=image.shape[:2])
        if not mask.any():
            raise ConfigError(f"{sample.mask}: the mask is empty; paint the region or leave the image out")
        images.append(image)
        out_masks.append(mask)
        names.append(sample.image.name)
    return images, out_masks, names
