"""Large images as chunked multiscale pyramids on disk (zarr), built by streaming.

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
* **Built** -- anything else (DICOM, flat TIFF, zarr, npy, PNG) is read through
  :func:`mim_workbench.io.read_image` (lazy dask above 32 MP, so a big TIFF is
  read tile by tile), quantised block by block to ``uint16`` (``uint8`` when the
  source is 8-bit: lossless there) into a zarr group, and every coarser level is
  the 2x2 mean of the previous one, computed chunk by chunk from disk.  Peak
  memory is one block, never the image.  The group carries OME-NGFF 0.4
  ``multiscales`` metadata (so other tools open it) and our :class:`ImageMeta`.

Stored values map to [0, 1] as ``(v - lo) / (hi - lo)`` with ``window = (lo, hi)``
(``(0, 65535)`` / ``(0, 255)`` for built pyramids); the windowing of the reader
(DICOM VOI, percentile, ...) is applied once while building.

Cache: ``<cache base>/pyramids/<key[:2]>/<key>.zarr`` (base: ``MIM_WORKBENCH_CACHE``,
else ``~/.cache/mim-workbench``).  The key is a sha256 over the source's resolved
path, size and ``mtime_ns`` and the build settings (plus :data:`PYRAMID_FORMAT` and
the package version): an edited source or another setting misses, so a stale
pyramid is never served.  Entries are written to a temporary name and renamed.

The cache has a soft cap (:data:`DEFAULT_PYRAMID_CACHE_BYTES`, or
``MIM_WORKBENCH_PYRAMID_CACHE_GB``): after each build the least recently opened
entries go until the total fits, but never one opened within :data:`KEEP_RECENT_S`
(a viewer or a training run may be reading it), so the cap can be exceeded for a day.
Every open stamps the entry's ``zarr.json`` (kernel atime is unreliable).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io.meta import ImageMeta

#: Bump when the built pyramid changes for identical inputs and settings.
PYRAMID_FORMAT = 1
#: Inputs with more pixels than this open as pyramids in the napari reader.
PYRAMID_THRESHOLD_PIXELS: int = 8_000_000
DEFAULT_CHUNK = 512
#: Coarsest level: the longest side stops shrinking at or below this.
DEFAULT_MIN_SIDE = 256
#: Soft cap of the pyramid cache (``MIM_WORKBENCH_PYRAMID_CACHE_GB`` overrides).
DEFAULT_PYRAMID_CACHE_BYTES = 20 * 1024**3
#: Entries opened this recently are never evicted.
KEEP_RECENT_S = 24 * 3600.0
#: Rows/cols per block while building (a multiple of the chunk): bounds memory.
BUILD_BLOCK = 2048


# ====================================================================== the pyramid
@dataclass
class Pyramid:
    """Levels of one image, finest first; each coarser level about half the previous."""

    levels: list[Any]                        # zarr arrays (H, W) or (H, W, 3)
    meta: ImageMeta                          # of level 0 (shape, spacing, windowing, notes)
    window: tuple[float, float]              # stored (lo, hi) -> [0, 1]
    store: Path | None = None                # cache entry (built) or the source file (in place)
    built: bool = True                       # False when the source's own levels are used
    notes: list[str] = field(default_factory=list)
    _keepalive: Any = None                   # e.g. tifffile's store, which owns the file handle

    @property
    def color(self) -> bool:
        return len(self.levels[0].shape) == 3

    @property
    def spacing(self) -> tuple[float, float] | None:
        return self.meta.spacing

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.levels[0].shape[:2])  # type: ignore[return-value]

    def level_shape(self, level: int) -> tuple[int, int]:
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

    def dask_levels(self) -> list[Any]:
        """The levels as dask arrays (chunked like the store): what napari displays."""
        import dask.array as da

        return [da.from_zarr(a) for a in self.levels]

    def to_unit(self, block: np.ndarray) -> np.ndarray:
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


def pyramid_from_arrays(levels: Any, *, scale: tuple[float, float] | None = None,
                        window: tuple[float, float] | None = None, source: str = "<memory>") -> Pyramid:
    """A :class:`Pyramid` over arrays already in memory (or dask/zarr), finest first.

    Why: a napari layer need not come from a file (pasted, computed, a plugin's
    output), yet tiled inference and large-image regions read it through the
    same window API.  Nothing is copied.  ``scale`` is level 0's pixel size (the
    layer's ``scale``; it becomes the spacing); ``window`` maps stored values to
    [0, 1] -- by default the rule of the non-tiled path: integers by their dtype
    range, floats already in [0, 1] as they are, other floats by the min/max of
    the coarsest level (cheap, and close to the image's).
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
def pyramid_cache_root() -> Path:
    """``$MIM_WORKBENCH_CACHE/pyramids``, else ``~/.cache/mim-workbench/pyramids``."""
    env = os.environ.get("MIM_WORKBENCH_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "mim-workbench"
    return base / "pyramids"


def pyramid_key(path: str | os.PathLike, settings: dict[str, Any]) -> str:
    """sha256 over the source identity (path, size, mtime_ns) and the build settings."""
    from mim_workbench.io.cache import DecodeCache

    return DecodeCache.key([path], {"pyramid_format": PYRAMID_FORMAT, **settings})


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
    key = pyramid_key(p, settings)
    entry = root / key[:2] / f"{key}.zarr"
    if not (entry / "zarr.json").is_file() or (pyr := _open_built(entry)) is None:
        guarded(p, lambda: build_pyramid(p, entry, keep_color=keep_color, chunk=chunk, min_side=min_side))
        pyr = _open_built(entry)
        if pyr is None:
            raise ReaderError(p, f"pyramid written to {entry} cannot be read back")
        _stamp(entry)
        prune_pyramid_cache(root)
    else:
        _stamp(entry)
    return pyr


def _stamp(entry: Path) -> None:
    try:
        os.utime(entry / "zarr.json")
    except OSError:
        pass


def pyramid_cache_cap() -> int:
    """The cache's soft cap in bytes: ``MIM_WORKBENCH_PYRAMID_CACHE_GB`` or the default."""
    env = os.environ.get("MIM_WORKBENCH_PYRAMID_CACHE_GB")
    if env:
        try:
            return int(float(env) * 1024**3)
        except ValueError:
            pass
    return DEFAULT_PYRAMID_CACHE_BYTES


def pyramid_cache_entries(root: str | os.PathLike | None = None) -> list[tuple[float, int, Path]]:
    """(last opened, bytes, folder) of every built pyramid in the cache."""
    from mim_workbench.io.cache import dir_size

    base = Path(root) if root is not None else pyramid_cache_root()
    out = []
    for entry in base.glob("*/*.zarr"):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            used = os.stat(entry / "zarr.json").st_mtime
        except OSError:
            used = 0.0
        out.append((used, dir_size(entry), entry))
    return out


def prune_pyramid_cache(root: str | os.PathLike | None = None, max_bytes: int | None = None,
                        now: float | None = None) -> list[Path]:
    """Remove the least recently opened pyramids until the cache fits ``max_bytes``, sparing
    those opened within :data:`KEEP_RECENT_S`; returns what was removed."""
    import time

    cap = pyramid_cache_cap() if max_bytes is None else int(max_bytes)
    now = time.time() if now is None else now
    entries = sorted(pyramid_cache_entries(root), key=lambda e: (e[0], e[2].name))
    total = sum(size for _, size, _ in entries)
    removed = []
    for used, size, entry in entries:
        if total <= cap:
            break
        if now - used < KEEP_RECENT_S:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


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


# ====================================================================== building
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
    top = float(np.iinfo(dtype).max)
    return (np.clip(np.nan_to_num(unit), 0.0, 1.0) * top + 0.5).astype(dtype)


def _blocks(shape: tuple[int, int], step: int):
    for r in range(0, shape[0], step):
        for c in range(0, shape[1], step):
            yield r, min(r + step, shape[0]), c, min(c + step, shape[1])


def downsample_into(src: Any, dst: Any, *, block: int = BUILD_BLOCK, rows: tuple[int, int] | None = None) -> None:
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


def create_levels(group: Any, shapes: list[tuple[int, int]], dtype: Any, *, channels: int | None = None,
                  chunk: int = DEFAULT_CHUNK, fill_value: Any = 0) -> list[Any]:
    """Empty zarr arrays ``"0"``, ``"1"``, ... of the given level shapes."""
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
    (lazily for large inputs) and quantised; coarser levels are 2x2 means.
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
