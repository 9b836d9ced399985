"""Large images as chunked multiscale pyramids on disk (zarr): the type, and opening one.

    pyr = open_pyramid("mammo.dcm")          # builds once, then served from the cache
    pyr.levels[0].shape, pyr.scale(2)        # full resolution; mm per pixel of level 2
    tile = pyr.read(1, (0, 512), (0, 512))   # float32 in [0, 1], zero-padded outside

Why: a 5000 px mammogram or a gigapixel slide must neither be loaded whole
(napari, training crops and tiled inference all read a window) nor shrunk to
224 px (MIRAM and RGMIM need the detail inside the region).

Two ways a :class:`Pyramid` comes about:

* **Used in place** -- a pyramidal TIFF's own levels (tifffile ``series.levels``
  through its zarr store) or an OME-Zarr ``multiscales`` group of 8-bit arrays.
  Nothing is copied; the file stays the single source of truth.
* **Built** -- anything else, once, by :mod:`mim_workbench.io.pyramid_build` into the
  disk cache of :mod:`mim_workbench.io.pyramid_cache`, where later opens find it.

Stored values map to [0, 1] as ``(v - lo) / (hi - lo)`` with ``window = (lo, hi)``.

The names of the builder and the cache (``mean2x2``, ``prune_pyramid_cache``, ...)
are importable from here too, where callers have always found them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io.meta import ImageMeta
from mim_workbench.io.pyramid_build import (
    BUILD_BLOCK,
    DEFAULT_CHUNK,
    DEFAULT_MIN_SIDE,
    PYRAMID_FORMAT,
    build_pyramid,
    create_levels,
    downsample_into,
    level_shapes,
    mean2x2,
    ngff_multiscales,
)
from mim_workbench.io.pyramid_cache import (
    DEFAULT_PYRAMID_CACHE_BYTES,
    KEEP_RECENT_S,
    cache_entry,
    prune_pyramid_cache,
    pyramid_cache_cap,
    pyramid_cache_entries,
    pyramid_cache_root,
    pyramid_key,
    stamp,
)

if TYPE_CHECKING:
    import dask.array as da
    import zarr

    #: One level's pixels: anything with ``shape``, ``dtype`` and numpy slicing.
    LevelArray = np.ndarray | da.Array | zarr.Array

__all__ = [
    "BUILD_BLOCK", "DEFAULT_CHUNK", "DEFAULT_MIN_SIDE", "DEFAULT_PYRAMID_CACHE_BYTES", "KEEP_RECENT_S",
    "PYRAMID_FORMAT", "PYRAMID_THRESHOLD_PIXELS", "Pyramid", "build_pyramid", "create_levels", "downsample_into",
    "level_shapes", "mean2x2", "ngff_multiscales", "open_pyramid", "prune_pyramid_cache", "pyramid_cache_cap",
    "pyramid_cache_entries", "pyramid_cache_root", "pyramid_from_arrays", "pyramid_key", "pyramid_levels_bytes",
    "wants_pyramid",
]

#: Inputs with more pixels than this open as pyramids in the napari reader.
PYRAMID_THRESHOLD_PIXELS: int = 8_000_000


# ====================================================================== the pyramid
@dataclass
class Pyramid:
    """Levels of one image, finest first; each coarser level about half the previous."""

    levels: list[LevelArray]                 # zarr arrays (numpy / dask from memory), (H, W) or (H, W, 3)
    meta: ImageMeta                          # of level 0 (shape, spacing, windowing, notes)
    window: tuple[float, float]              # stored (lo, hi) -> [0, 1]
    store: Path | None = None                # cache entry (built) or the source file (in place)
    built: bool = True                       # False when the source's own levels are used
    notes: list[str] = field(default_factory=list)
    _keepalive: Any = None                   # e.g. tifffile's store, which owns the file handle

    @property
    def color(self) -> bool:
        """True when the levels are colour, (H, W, 3)."""
        return len(self.levels[0].shape) == 3

    @property
    def spacing(self) -> tuple[float, float] | None:
        """(row, col) mm per level-0 pixel; None when unknown."""
        return self.meta.spacing

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of level 0, in pixels."""
        return tuple(int(s) for s in self.levels[0].shape[:2])  # type: ignore[return-value]

    def level_shape(self, level: int) -> tuple[int, int]:
        """(h, w) of ``level``, in pixels."""
        return tuple(int(s) for s in self.levels[level].shape[:2])  # type: ignore[return-value]

    def factor(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level`` along (rows, cols)."""
        (h0, w0), (h, w) = self.shape, self.level_shape(level)
        return h0 / h, w0 / w

    def scale(self, level: int = 0) -> tuple[float, float]:
        """napari ``scale`` of ``level``: mm per pixel when the spacing is known, else level-0 pixels."""
        base = self.spacing or (1.0, 1.0)
        fy, fx = self.factor(level)
        return float(base[0] * fy), float(base[1] * fx)

    def level_for_spacing(self, spacing_mm: float) -> int:
        """The coarsest level whose pixels are no larger than ``spacing_mm`` (level 0 at least)."""
        best = 0
        for k in range(len(self.levels)):
            if min(self.scale(k)) <= spacing_mm * (1 + 1e-6):
                best = k
        return best

    def level_for_max_side(self, max_side: int) -> int:
        """The finest level whose longest side is at most ``max_side`` (the coarsest when none is)."""
        for k in range(len(self.levels)):
            if max(self.level_shape(k)) <= max_side:
                return k
        return len(self.levels) - 1

    def dask_levels(self) -> list[da.Array]:
        """The levels as dask arrays (chunked like the store): what napari displays."""
        import dask.array as da

        return [da.from_zarr(a) for a in self.levels]

    def to_unit(self, block: np.ndarray) -> np.ndarray:
        """Stored values -> float32 [0, 1] through ``window`` (clipped), same shape as ``block``."""
        lo, hi = self.window
        out = (np.asarray(block, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / max(hi - lo, 1e-12))
        return np.clip(out, 0.0, 1.0, out=out)

    def read(self, level: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """float32 [0, 1] window ``[r0:r1, c0:c1]`` of ``level``; zero outside the image."""
        arr = self.levels[level]
        H, W = arr.shape[:2]
        (r0, r1), (c0, c1) = rows, cols
        out = np.zeros((r1 - r0, c1 - c0) + tuple(arr.shape[2:]), dtype=np.float32)
        a0, a1, b0, b1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
        if a1 > a0 and b1 > b0:
            out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = self.to_unit(arr[a0:a1, b0:b1])
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as float32 [0, 1] (for the small, coarse levels only)."""
        h, w = self.level_shape(level)
        return self.read(level, (0, h), (0, w))


def pyramid_from_arrays(levels: list[LevelArray] | tuple[LevelArray, ...] | LevelArray, *,
                        scale: tuple[float, float] | None = None,
                        window: tuple[float, float] | None = None, source: str = "<memory>") -> Pyramid:
    """A :class:`Pyramid` over arrays already in memory (or dask/zarr), finest first.

    Why: a napari layer need not come from a file (pasted, computed, a plugin's
    output), yet tiled inference and large-image regions read it through the
    same window API.  Nothing is copied.  ``scale`` is level 0's pixel size (the
    layer's ``scale``; it becomes the spacing); ``window`` maps stored values to
    [0, 1] -- by default the rule of the non-tiled path: integers by their dtype
    range, floats already in [0, 1] as they are, other floats by the min/max of
    the coarsest level (cheap, and close to the image's).  ReaderError naming ``source``
    when there are no levels or level 0 is not (H, W) or (H, W, C).
    """
    levels = list(levels) if isinstance(levels, (list, tuple)) else [levels]
    if not levels or len(levels[0].shape) not in (2, 3):
        raise ReaderError(source, f"expected 2-D (H, W) or (H, W, C) levels, got {[tuple(a.shape) for a in levels]}")
    dtype = np.dtype(levels[0].dtype)
    if window is None:
        if dtype.kind in "ui":
            window = (0.0, float(np.iinfo(dtype).max))
        elif dtype == bool:
            window = (0.0, 1.0)
        else:
            coarse = np.asarray(levels[-1])
            lo, hi = float(np.nanmin(coarse)), float(np.nanmax(coarse))
            window = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi if hi > lo else lo + 1.0)
    shape = tuple(int(s) for s in levels[0].shape)
    colour = len(shape) == 3
    spacing = (float(scale[0]), float(scale[1])) if scale is not None else None
    meta = ImageMeta(source=str(source), kind="image", shape=shape, spacing=spacing, modality=None,
                     photometric="RGB" if colour else "MONOCHROME2", original_dtype=dtype.name,
                     original_range=(float(window[0]), float(window[1])), window=None, window_source="minmax",
                     color=colour, notes=[f"in-memory pyramid of {len(levels)} level(s)"])
    return Pyramid(levels=levels, meta=meta, window=(float(window[0]), float(window[1])), store=None, built=False,
                   notes=list(meta.notes))


# ====================================================================== opening
def open_pyramid(path: str | os.PathLike, *, keep_color: bool = True, chunk: int = DEFAULT_CHUNK,
                 min_side: int = DEFAULT_MIN_SIDE, cache_root: str | os.PathLike | None = None,
                 use_source_levels: bool = True) -> Pyramid:
    """Open ``path`` as a :class:`Pyramid`, building (and caching) it when needed.

    ``keep_color`` keeps RGB (slides); grey otherwise.  ``use_source_levels=False``
    forces a build even for a pyramidal TIFF.  Raises ReaderError on unreadable input.
    """
    from mim_workbench.io.formats import sniff
    from mim_workbench.io.readers import guarded

    p = Path(path)
    if not p.exists():
        raise ReaderError(p, "file not found")
    fmt, _notes = sniff(p)
    if use_source_levels:
        if fmt == "tiff":
            found = guarded(p, lambda: _tiff_in_place(p, keep_color))
            if found is not None:
                return found
        elif fmt == "zarr":
            found = guarded(p, lambda: _ome_zarr_in_place(p, keep_color))
            if found is not None:
                return found
    settings = {"keep_color": bool(keep_color), "chunk": int(chunk), "min_side": int(min_side)}
    root = Path(cache_root) if cache_root is not None else pyramid_cache_root()
    entry = cache_entry(p, settings, root)
    if not (entry / "zarr.json").is_file() or (pyr := _open_built(entry)) is None:
        guarded(p, lambda: build_pyramid(p, entry, keep_color=keep_color, chunk=chunk, min_side=min_side))
        pyr = _open_built(entry)
        if pyr is None:
            raise ReaderError(p, f"pyramid written to {entry} cannot be read back")
        stamp(entry)
        prune_pyramid_cache(root)
    else:
        stamp(entry)
    return pyr


def _open_built(entry: Path) -> Pyramid | None:
    import zarr

    try:
        group = zarr.open_group(str(entry), mode="r")
        info = dict(group.attrs["mim_workbench"])
        levels = [group[str(k)] for k in range(int(info["n_levels"]))]
    except Exception:  # missing or damaged entry: rebuilt by the caller
        return None
    meta_d = dict(info["meta"])
    meta = ImageMeta(**{**meta_d, "shape": tuple(meta_d["shape"]),
                        "spacing": tuple(meta_d["spacing"]) if meta_d.get("spacing") else None,
                        "original_range": tuple(meta_d["original_range"]),
                        "window": tuple(meta_d["window"]) if meta_d.get("window") else None})
    return Pyramid(levels=levels, meta=meta, window=tuple(info["window"]), store=entry, built=True,
                   notes=list(info.get("notes", [])))


def _tiff_in_place(p: Path, keep_color: bool) -> Pyramid | None:
    """A pyramidal TIFF's own levels, when 8-bit (values are their own window)."""
    import tifffile
    import zarr

    with tifffile.TiffFile(p) as tif:
        series = tif.series[0] if tif.series else None
        if series is None or len(getattr(series, "levels", [])) < 2:
            return None
        level0 = series.levels[0]
        axes = series.axes
        dtype = np.dtype(level0.dtype)
        shape = tuple(int(s) for s in level0.shape)
        photometric = getattr(series.keyframe.photometric, "name", "")
    colour = axes.endswith("S") and len(shape) == 3 and shape[-1] in (3, 4)
    if dtype != np.uint8 or not (len(shape) == 2 or colour) or photometric not in ("MINISBLACK", "RGB"):
        return None  # other layouts are built through the reader (windowing, planar, palette)
    if colour and (shape[-1] != 3 or not keep_color):
        return None
    store = tifffile.imread(p, aszarr=True, series=0)
    group = zarr.open(store, mode="r")
    levels = [group[str(k)] for k in range(len(list(group.array_keys())))]
    meta = ImageMeta(source=str(p), kind="image", shape=shape, spacing=_tiff_spacing(p), modality=None,
                     photometric="RGB" if colour else "MONOCHROME2", original_dtype="uint8",
                     original_range=(0.0, 255.0), window=(127.5, 255.0), window_source="dtype_range",
                     color=colour, notes=[f"pyramidal TIFF: its {len(levels)} levels used in place"])
    return Pyramid(levels=levels, meta=meta, window=(0.0, 255.0), store=p, built=False,
                   notes=list(meta.notes), _keepalive=store)


def _tiff_spacing(p: Path) -> tuple[float, float] | None:
    """mm per pixel from the TIFF resolution tags, when they name a real unit."""
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            page = tif.pages[0]
            unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 1
            if unit not in (2, 3) or "XResolution" not in page.tags:
                return None
            per = 25.4 if unit == 2 else 10.0  # inch / cm in mm
            xn, xd = page.tags["XResolution"].value
            yn, yd = page.tags["YResolution"].value
            if not (xn and yn):
                return None
            return (per * yd / yn, per * xd / xn)
    except Exception:
        return None


def _ome_zarr_in_place(p: Path, keep_color: bool) -> Pyramid | None:
    """An OME-Zarr ``multiscales`` group of 2-D 8-bit arrays (our own output included)."""
    import zarr

    node = zarr.open(str(p), mode="r")
    if hasattr(node, "dtype"):
        return None
    ours = node.attrs.get("mim_workbench")
    if ours is not None:
        return _open_built(p)
    ms = node.attrs.get("multiscales") or (node.attrs.get("ome") or {}).get("multiscales")
    if not ms:
        return None
    paths = [d["path"] for d in ms[0]["datasets"]]
    levels = [node[q] for q in paths]
    shape = tuple(int(s) for s in levels[0].shape)
    if np.dtype(levels[0].dtype) != np.uint8 or len(shape) != 2:
        return None  # a (t, c, z, y, x) or wider-typed store: built through the reader
    spacing = None
    try:
        for t in ms[0]["datasets"][0].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                axes = [a.get("name") if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
                units = [a.get("unit") if isinstance(a, dict) else None for a in ms[0].get("axes", [])]
                sy, sx = (float(v) for v in t["scale"][-2:])
                to_mm = {"millimeter": 1.0, "micrometer": 1e-3, "centimeter": 10.0}.get(units[-1] if units else "", None)
                if to_mm is not None and axes[-2:] == ["y", "x"]:
                    spacing = (sy * to_mm, sx * to_mm)
    except (KeyError, TypeError, ValueError, IndexError):
        spacing = None
    meta = ImageMeta(source=str(p), kind="image", shape=shape, spacing=spacing, modality=None,
                     photometric="MONOCHROME2", original_dtype="uint8", original_range=(0.0, 255.0),
                     window=(127.5, 255.0), window_source="dtype_range", color=False,
                     notes=[f"OME-Zarr: its {len(levels)} levels used in place"])
    return Pyramid(levels=levels, meta=meta, window=(0.0, 255.0), store=p, built=False, notes=list(meta.notes))


# ====================================================================== deciding
def wants_pyramid(path: str | os.PathLike, threshold: int | None = None) -> bool:
    """Whether ``path`` should open as a pyramid: already pyramidal, or above ``threshold`` pixels.

    Reads headers only (DICOM Rows/Columns, TIFF/zarr shapes); False when unsure.
    """
    from mim_workbench.io.formats import sniff

    limit = PYRAMID_THRESHOLD_PIXELS if threshold is None else int(threshold)
    p = Path(path)
    try:
        fmt, _ = sniff(p)
        if fmt == "dicom":
            from mim_workbench.io import dicom as _dicom

            ds = _dicom.load(p, header_only=True)
            if _dicom.is_segmentation(ds) or _dicom.n_frames(ds) > 1:
                return False
            return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) > limit
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(p) as tif:
                s = tif.series[0]
                if len(getattr(s, "levels", [])) > 1:
                    return True
                shape = [int(v) for v in s.shape]
                dims = [d for a, d in zip(s.axes, shape) if a in "YX"]
                return len(dims) == 2 and dims[0] * dims[1] > limit
        if fmt == "zarr":
            import zarr

            node = zarr.open(str(p), mode="r")
            if not hasattr(node, "dtype"):
                if node.attrs.get("multiscales") or node.attrs.get("mim_workbench"):
                    return True
            from mim_workbench.io.raster import open_zarr_array, plane_shape

            arr, _ = open_zarr_array(p)
            h, w = plane_shape(arr.shape)
            return h * w > limit
        if fmt == "npy":
            from mim_workbench.io.raster import _npy_header, plane_shape

            h, w = plane_shape(_npy_header(p)[0])
            return h * w > limit
        if fmt in ("png", "jpeg"):
            import warnings

            from PIL import Image

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(p) as im:
                        return im.size[0] * im.size[1] > limit
            except Image.DecompressionBombError:
                return True
    except Exception:
        return False
    return False


def pyramid_levels_bytes(pyr: Pyramid) -> int:
    """Uncompressed bytes of every level (for reports)."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in pyr.levels))
