"""Per-file descriptions for ``mim-workbench info`` (JSON Lines) and the GUI.

One dict per file, always JSON-serialisable; a file that cannot be read yields
``{"path": ..., "error": "<path>: <problem>"}`` (one line) instead of stopping the listing, so a
folder survey reports every bad file at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io.dicom_tree import scan_tree
from mim_workbench.io.formats import is_zarr_dir
from mim_workbench.io.meta import LoadedImage, json_safe, is_dask
from mim_workbench.io.readers import _read_one, guarded, list_image_files


def describe(image: LoadedImage) -> dict:
    """The info record of one loaded image (reads lazy data once, chunk by chunk, for min/max)."""
    data = image.data
    lo, hi = data.min(), data.max()
    if is_dask(data):
        import dask

        lo, hi = dask.compute(lo, hi)
    meta = image.meta
    record = {
        "path": meta.source,
        "kind": meta.kind,
        "shape": list(meta.shape),
        "dtype": str(np.dtype(data.dtype)),
        "spacing": meta.spacing,
        "modality": meta.modality,
        "photometric": meta.photometric,
        "window": meta.window,
        "window_source": meta.window_source,
        "original_dtype": meta.original_dtype,
        "original_range": meta.original_range,
        "min": float(lo),
        "max": float(hi),
        "color": meta.color,
        "lazy": image.lazy,
        "notes": list(meta.notes),
    }
    return json_safe(record)


def info_records(path: str | os.PathLike, *, keep_color: bool = False, recursive: bool = False) -> Iterator[dict]:
    """Yield one record per supported file in ``path`` (a file, zarr store or folder).

    Folders are listed by name (``recursive`` descends into sub-folders); a folder with no
    image of its own is read as a tree of DICOM files (a hospital export), its images only.
    """
    p = Path(path)
    if p.is_dir() and not is_zarr_dir(p):
        files = _walk(p, recursive) or [f for f, _header in scan_tree(p).images]
        if not files:
            yield {"path": str(p), "error": f"{p}: directory holds no supported image files"}
    else:
        files = [p]
    for f in files:
        try:
            image = guarded(f, lambda f=f: _read_one(f, keep_color))
            yield guarded(f, lambda image=image: describe(image))
        except ReaderError as exc:
            # The message names the file too, so it stands alone when printed (CLI stderr).
            yield {"path": str(f), "error": str(exc)}


def _walk(folder: Path, recursive: bool) -> list[Path]:
    try:
        files = list_image_files(folder)
    except ReaderError:
        return []
    if recursive:
        for sub in sorted(q for q in folder.iterdir() if q.is_dir() and not is_zarr_dir(q) and not q.name.startswith(".")):
            files.extend(_walk(sub, True))
    return files
