"""Building a pyramid: level 0 quantised from the reader's output, every coarser level 2x2 means.

Anything without usable levels of its own (DICOM, flat TIFF, zarr, npy, PNG) is read
through :func:`mim_workbench.io.read_image` (lazy dask above 32 MP, so a big TIFF is
read tile by tile), quantised block by block to ``uint16`` (``uint8`` when the source
is 8-bit: lossless there) into a zarr group, and every coarser level is the 2x2 mean
of the previous one, computed chunk by chunk from disk.  Peak memory is one block,
never the image.  The group carries OME-NGFF 0.4 ``multiscales`` metadata (so other
tools open it) and our :class:`~mim_workbench.io.meta.ImageMeta`; stored values map
to [0, 1] through ``window = (0, 65535)`` / ``(0, 255)``, the reader's windowing
(DICOM VOI, percentile, ...) having been applied once while building.

The level helpers (:func:`level_shapes`, :func:`mean2x2`, :func:`create_levels`,
:func:`ngff_multiscales`) also serve tiled inference, which writes pyramids of maps.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
    import zarr

#: Bump when the built pyramid changes for identical inputs and settings.
PYRAMID_FORMAT = 1
DEFAULT_CHUNK = 512
#: Coarsest level: the longest side stops shrinking at or below this.
DEFAULT_MIN_SIDE = 256
#: Rows/cols per block while building (a multiple of the chunk): bounds memory.
BUILD_BLOCK = 2048


def level_shapes(shape: tuple[int, int], min_side: int) -> list[tuple[int, int]]:
    """(H, W) of every level: halved (rounding up) until the longest side is <= ``min_side``."""
    out = [(int(shape[0]), int(shape[1]))]
    while max(out[-1]) > min_side and min(out[-1]) > 1:
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


def mean2x2(block: np.ndarray) -> np.ndarray:
    """2x2 mean (float32); an odd last row/column is repeated so edges keep their value."""
    b = np.asarray(block, dtype=np.float32)
    h, w = b.shape[:2]
    if h % 2 or w % 2:
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (b.ndim - 2)
        b = np.pad(b, pad, mode="edge")
    h2, w2 = b.shape[0] // 2, b.shape[1] // 2
    return b.reshape(h2, 2, w2, 2, *b.shape[2:]).mean(axis=(1, 3))


def _quantise(unit: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """[0, 1] values (NaN as 0, clipped) to the full range of the integer ``dtype``, rounded."""
    top = float(np.iinfo(dtype).max)
    return (np.clip(np.nan_to_num(unit), 0.0, 1.0) * top + 0.5).astype(dtype)


def _blocks(shape: tuple[int, int], step: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the ``step``-sized blocks covering ``shape``, row by row."""
    for r in range(0, shape[0], step):
        for c in range(0, shape[1], step):
            yield r, min(r + step, shape[0]), c, min(c + step, shape[1])


def downsample_into(src: zarr.Array | np.ndarray, dst: zarr.Array | np.ndarray, *, block: int = BUILD_BLOCK,
                    rows: tuple[int, int] | None = None) -> None:
    """Write ``dst`` (about half of ``src``) as 2x2 means of ``src``, block by block.

    ``rows`` restricts the update to destination rows ``[r0, r1)`` (used when a
    tiled output grows band by band).  Integer outputs are rounded.
    """
    H, W = dst.shape[:2]
    r_lo, r_hi = rows if rows is not None else (0, H)
    r_lo, r_hi = max(0, r_lo), min(H, r_hi)
    kind = np.dtype(dst.dtype).kind
    for r0 in range(r_lo, r_hi, block):
        r1 = min(r0 + block, r_hi)
        for c0 in range(0, W, block):
            c1 = min(c0 + block, W)
            s = np.asarray(src[2 * r0:min(2 * r1, src.shape[0]), 2 * c0:min(2 * c1, src.shape[1])])
            m = mean2x2(s)[: r1 - r0, : c1 - c0]
            dst[r0:r1, c0:c1] = np.rint(m).astype(dst.dtype) if kind in "ui" else m.astype(dst.dtype)


def ngff_multiscales(shapes: list[tuple[int, int]], spacing: tuple[float, float] | None,
                     *, color: bool = False, name: str = "image") -> list[dict[str, Any]]:
    """OME-NGFF 0.4 ``multiscales`` metadata for (y, x[, c]) levels."""
    base = spacing or (1.0, 1.0)
    unit = "millimeter" if spacing else None
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if unit:
        for a in axes:
            a["unit"] = unit
    if color:
        axes.append({"name": "c", "type": "channel"})
    datasets = []
    for k, (h, w) in enumerate(shapes):
        s = [base[0] * shapes[0][0] / h, base[1] * shapes[0][1] / w] + ([1.0] if color else [])
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": s}]})
    return [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets}]


def create_levels(group: zarr.Group, shapes: list[tuple[int, int]], dtype: npt.DTypeLike, *,
                  channels: int | None = None, chunk: int = DEFAULT_CHUNK, fill_value: float = 0) -> list[zarr.Array]:
    """Empty zarr arrays ``"0"``, ``"1"``, ... in ``group``, one per level shape (+ ``channels`` last), finest first.

    Chunks are at most ``chunk`` pixels a side (channels whole); unwritten pixels read as ``fill_value``.
    """
    out = []
    for k, (h, w) in enumerate(shapes):
        shp = (h, w) + ((channels,) if channels else ())
        chunks = (min(chunk, h), min(chunk, w)) + ((channels,) if channels else ())
        out.append(group.create_array(str(k), shape=shp, dtype=dtype, chunks=chunks, fill_value=fill_value))
    return out


def build_pyramid(path: str | os.PathLike, dest: str | os.PathLike, *, keep_color: bool = True,
                  chunk: int = DEFAULT_CHUNK, min_side: int = DEFAULT_MIN_SIDE) -> Path:
    """Build the pyramid of ``path`` into the zarr group ``dest`` (atomically); returns ``dest``.

    Level 0 is read through :func:`~mim_workbench.io.read_image` block by block
    (lazily for large inputs) and quantised; coarser levels are 2x2 means.  Raises the
    reader's :class:`~mim_workbench.errors.ReaderError` for an unreadable source; nothing
    is left at ``dest`` when the build fails.
    """
    import zarr

    from mim_workbench.io.readers import read_image

    loaded = read_image(path, keep_color=keep_color)
    data, meta = loaded.data, loaded.meta
    shape = tuple(int(s) for s in data.shape[:2])
    color = data.ndim == 3
    dtype = np.dtype(np.uint8) if meta.original_dtype in ("uint8", "int8", "bool") else np.dtype(np.uint16)
    top = float(np.iinfo(dtype).max)
    shapes = level_shapes(shape, min_side)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{uuid.uuid4().hex}.zarr"
    try:
        group = zarr.open_group(str(tmp), mode="w")
        levels = create_levels(group, shapes, dtype, channels=data.shape[2] if color else None, chunk=chunk)
        step = max(chunk, (BUILD_BLOCK // chunk) * chunk)
        for r0, r1, c0, c1 in _blocks(shape, step):
            block = data[r0:r1, c0:c1]
            block = block.compute() if hasattr(block, "compute") else block
            levels[0][r0:r1, c0:c1] = _quantise(np.asarray(block), dtype)
        for k in range(1, len(levels)):
            downsample_into(levels[k - 1], levels[k])
        meta_d = meta.to_dict()
        meta_d["notes"] = list(meta_d.get("notes", [])) + [f"pyramid of {len(levels)} levels ({dtype.name})"]
        group.attrs["multiscales"] = ngff_multiscales(shapes, meta.spacing, color=color, name=Path(path).name)
        group.attrs["mim_workbench"] = json.loads(json.dumps({
            "n_levels": len(levels), "window": [0.0, top], "meta": meta_d, "source": str(Path(path).resolve()),
            "format": PYRAMID_FORMAT, "notes": meta_d["notes"],
        }))
        try:
            os.rename(tmp, dest)
        except OSError:  # built concurrently by someone else: theirs is as good
            if not (dest / "zarr.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
