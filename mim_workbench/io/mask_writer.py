"""Save region masks so painting survives: atomic writes, formats by extension."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ReaderError
from ..faults import fault_point

MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")


def save_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a 2-D region mask (nonzero = region) as PNG/TIFF (0/255 uint8) or .npy (labels kept).

    Written to a temporary file in the same folder and renamed, so a crash mid-write
    never leaves a truncated mask where a good one was.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MASK_EXTENSIONS:
        raise ReaderError(path, f"cannot save a mask as '{ext or 'no extension'}'; use one of {', '.join(MASK_EXTENSIONS)}")
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ReaderError(path, f"a region mask must be 2-D, got shape {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=ext, dir=path.parent)
    os.close(fd)
    try:
        if ext == ".npy":
            np.save(tmp, arr.astype(np.uint8 if arr.max(initial=0) < 256 else np.uint16), allow_pickle=False)
        else:
            out = np.where(arr > 0, 255, 0).astype(np.uint8)
            if ext == ".png":
                from PIL import Image

                Image.fromarray(out).save(tmp, format="PNG")
            else:
                import tifffile

                tifffile.imwrite(tmp, out, compression="zlib")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        fault_point("mask-before-rename")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
