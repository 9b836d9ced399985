"""Put in-memory images, labels and painted strokes on disk for a training run.

The GUI hands the core napari layers: some come from files, some only exist in
memory (sample data, a crop, a layer the user built).  Training runs in a child
process and must be reproducible from its run folder, so the inputs are staged
there first: images without a readable source file are written as ``.npy``,
strokes always are (they only exist in the viewer), and a CSV manifest lists the
labelled images.  Staging also means painted strokes survive a crash of the
viewer or of the training run.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class StagedImage:
    """One image for training: a display name, its pixels, and where they came from."""

    name: str
    data: Any                       # array-like (H, W) or (H, W, C)
    source: str | None = None       # a file the image was read from, if it still exists
    label: str | None = None
    strokes: Any = None             # (H, W) integer labels, 0 = unlabelled


def safe_stem(name: str) -> str:
    """A file stem from a layer name: no path separators or shell-hostile characters."""
    stem = _UNSAFE.sub("_", name).strip("._") or "image"
    return stem[:80]


def _unique_stems(items: Sequence[StagedImage]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for it in items:
        stem = safe_stem(it.name)
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def _image_path(item: StagedImage, stem: str, folder: Path) -> Path:
    """The source file when it can be read again, else the pixels written as ``.npy``."""
    if item.source and Path(item.source).is_file():
        return Path(item.source)
    arr = np.asarray(item.data)
    if arr.ndim not in (2, 3):
        raise ConfigError(f"image {item.name!r}: expected a 2-D (or RGB) image, got shape {arr.shape}")
    path = folder / f"{stem}.npy"
    tmp = folder / f".{stem}.tmp.npy"
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)
    return path


def stage_labelled(items: Sequence[StagedImage], folder: str | Path) -> Path:
    """Write a manifest ``labels.csv`` (id, image, label) for ``items``; returns its path.

    Items without a label are left out; fewer than two classes is an error naming them.
    """
    folder = Path(folder)
    labelled = [it for it in items if it.label not in (None, "")]
    classes = sorted({str(it.label) for it in labelled})
    if len(classes) < 2:
        names = ", ".join(it.name for it in items) or "none"
        raise ConfigError(f"labels from layers: need images of at least two classes, found {len(classes)} "
                          f"({', '.join(classes) or 'no labels'}) among layers: {names}")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for it, stem in zip(labelled, _unique_stems(labelled)):
        rows.append({"id": stem, "image": str(_image_path(it, stem, folder)), "label": str(it.label)})
    manifest = folder / "labels.csv"
    tmp = folder / ".labels.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def stage_strokes(items: Sequence[StagedImage], folder: str | Path) -> tuple[list[str], list[str]]:
    """Write each item's strokes (``<stem>_strokes.npy``) and, if needed, its image.

    Returns (image paths, stroke paths) for :func:`mim_workbench.training.dense.train_dense`.
    Items whose strokes are all 0 are left out; none left is an error.
    """
    from .mask_writer import save_mask

    folder = Path(folder)
    painted = []
    for it in items:
        if it.strokes is None:
            continue
        s = np.asarray(it.strokes)
        if s.shape != np.asarray(it.data).shape[:2]:
            raise ConfigError(f"strokes of {it.name!r} have shape {s.shape}, the image {np.asarray(it.data).shape[:2]}")
        if s.any():
            painted.append(it)
    if not painted:
        raise ConfigError("no painted strokes: paint a few strokes of each class on a strokes layer first")
    folder.mkdir(parents=True, exist_ok=True)
    images, strokes = [], []
    for it, stem in zip(painted, _unique_stems(painted)):
        images.append(str(_image_path(it, stem, folder)))
        strokes.append(str(save_mask(folder / f"{stem}_strokes.npy", np.asarray(it.strokes))))
    return images, strokes


__all__ = ["StagedImage", "safe_stem", "stage_labelled", "stage_strokes"]
