"""Synthetic large inputs for the large-image tests (not a test module).

Both are written once per session into a temporary folder:

* a 5000x4000 16-bit MG DICOM (real Digital Mammography tags, ImagerPixelSpacing),
  drawn at 1/8 resolution and enlarged so it takes about a second;
* an 8-bit 30000x30000 pyramidal TIFF written tile by tile from a generator
  (compressible content, ~15 MB on disk), never held in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAMMO_SHAPE = (5000, 4000)
MAMMO_SPACING = (0.07, 0.065)
BIG_SIDE = 30000
BIG_TILE = 512

_made: dict[str, Path] = {}


def mammogram_pixels(shape: tuple[int, int] = MAMMO_SHAPE, seed: int = 3) -> np.ndarray:
    """uint16 breast (half-ellipse against the left edge), pectoral wedge, texture, background."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = shape[0] // 8, shape[1] // 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, ry, rx = h * 0.52, h * 0.46, w * 0.78
    inside = ((yy - cy) / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    depth = np.sqrt(np.clip(1.0 - ((yy - cy) / ry) ** 2 - (xx / rx) ** 2, 0, 1))
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 3)
    texture /= texture.std() + 1e-6
    tissue = 24000 + 14000 * depth + 4000 * texture * depth
    tissue = np.where(xx / (w * 0.32) + yy / (h * 0.42) < 1.0, tissue + 9000, tissue)
    small = np.where(inside, tissue, 1200.0)
    big = ndimage.zoom(small, (shape[0] / h, shape[1] / w), order=1)[: shape[0], : shape[1]]
    big += rng.normal(0, 300, size=big.shape).astype(np.float32)  # fine detail for the model
    return np.clip(big, 0, 65535).astype(np.uint16)


def write_mammogram_dicom(path: Path, shape: tuple[int, int] = MAMMO_SHAPE) -> Path:
    from mim_workbench.sample import write_mg_dicom

    return write_mg_dicom(path, mammogram_pixels(shape), spacing_mm=MAMMO_SPACING, window=(30000, 40000),
                          patient=("SYNTHETIC^LARGE", "SYNTH-LARGE"))


def _tiles(side: int, tile: int):
    """Tiles of a smooth, compressible 8-bit pattern (a few gradients + a grid), row-major."""
    n = (side + tile - 1) // tile
    yy, xx = np.mgrid[0:tile, 0:tile]
    base = ((yy // 16 + xx // 16) % 2) * 40
    for i in range(n):
        for j in range(n):
            yield (base + (i * 5 + j * 3) % 150 + 30).astype(np.uint8)


def write_pyramidal_tiff(path: Path, side: int = BIG_SIDE, tile: int = BIG_TILE) -> Path:
    import tifffile

    sides = [side]
    while sides[-1] > 1024:
        sides.append((sides[-1] + 1) // 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, s in enumerate(sides):
            tw.write(_tiles(s, tile), shape=(s, s), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", compressionargs={"level": 1}, photometric="minisblack",
                     subifds=len(sides) - 1 if k == 0 else None, subfiletype=1 if k else 0)
    return path


def mammogram(folder: Path) -> Path:
    if "mammo" not in _made:
        _made["mammo"] = write_mammogram_dicom(folder / "mammo_5000x4000.dcm")
    return _made["mammo"]


def pyramidal_tiff(folder: Path) -> Path:
    if "tiff" not in _made:
        _made["tiff"] = write_pyramidal_tiff(folder / "slide_30000.tif")
    return _made["tiff"]
