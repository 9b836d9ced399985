"""Autosave of the region masks painted in the viewer, so a crash or a killed viewer loses no painting.

Each image gets one autosave file keyed by its source (path, or layer name when the
image has no file), written atomically through :func:`save_mask` as ``.npy`` so label
values survive. The folder is ``$MIM_WORKBENCH_CACHE/autosave`` or
``~/.cache/mim-workbench/autosave``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from mim_workbench.io.mask_writer import save_mask


def autosave_dir() -> Path:
    """The folder autosaves go to (it may not exist yet)."""
    base = os.environ.get("MIM_WORKBENCH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mim-workbench") / "autosave"


def autosave_path(image_key: str) -> Path:
    """The autosave file of the image ``image_key`` names: a readable stem plus a hash of the whole key."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(image_key)).stem)[:60] or "mask"
    digest = hashlib.sha1(str(image_key).encode()).hexdigest()[:10]
    return autosave_dir() / f"{stem}-{digest}.npy"


def autosave_mask(image_key: str, mask: np.ndarray) -> Path:
    """Save ``mask`` (2-D labels) as the image's autosave, atomically; returns the file."""
    return save_mask(autosave_path(image_key), np.asarray(mask))


def load_autosave(image_key: str, shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The autosaved mask for this image, or None (also when its shape no longer fits)."""
    path = autosave_path(image_key)
    if not path.is_file():
        return None
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if mask.ndim != 2 or (shape is not None and tuple(mask.shape) != tuple(shape)):
        return None
    return mask
