"""Overlapping tiles with blending, streamed band by band into a zarr pyramid.

Whole-image inference on a mammogram or slide cannot hold the image, let alone
float32 maps of it, in memory.  :func:`run_tiled` walks a ``tile``-sized window
over one level in rows of tiles with ``overlap``; every tile's outputs are
accumulated with a smooth window weight (``sin²`` ramps, so seams vanish) into
an in-memory *band* only as tall as one tile plus one stride.  When a tile row
is done, the rows no later tile can touch are final: they are divided by their
weight (in place), written to each output's zarr level 0, the coarser levels'
rows they complete are computed from that band in memory (2x2 means; one
unpaired row per level waits for the next band) and written too, and a
:class:`Band` is yielded -- a GUI can repaint a multiscale layer while the run
goes on.  Memory: O(tile height x image width).

Why the chunk layout matters: with ``chunk_rows`` = the tile stride
(:func:`band_rows`), every band of level 0 is a whole row of chunks, so zarr
writes it without reading anything back; nothing is ever read back from the
output to refresh the coarser levels either.  (Read-modify-write of partial
512² chunks and re-reading level 0 for the 2x2 means were most of the transient
memory of the first version.)

Each output map is blended as ``sum(w * v) / sum(w)`` where the tile function
returns the values ``v`` and, optionally, one per-pixel weight factor (e.g. "count
this prediction fully where the pixel was masked, barely where it was visible").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ConfigError
from mim_workbench.io.pyramid import Pyramid, open_pyramid
from mim_workbench.io.pyramid_build import create_levels, level_shapes, mean2x2, ngff_multiscales

if TYPE_CHECKING:  # torch and zarr are imported where they are used: importing this module stays light
    import numpy.typing as npt
    import torch
    import zarr

#: Smallest blending weight at a tile's edge: pixels at the image border, covered by one tile edge only, stay defined.
EDGE_WEIGHT = 1e-2

TileFn = Callable[[np.ndarray, list[tuple[int, int]]], tuple[dict[str, np.ndarray], np.ndarray | None]]


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``[0, n)``; the last tile ends at ``n`` (no padding) when ``n >= tile``."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    starts.append(n - tile)
    return starts


def blend_window(h: int, w: int) -> np.ndarray:
    """``sin²`` ramp window in (EDGE_WEIGHT, 1], float32 [h, w]."""
    def ramp(n: int) -> np.ndarray:
        """``[n]`` float32 weights ``sin²`` over pixel centres, at least EDGE_WEIGHT."""
        return np.maximum(np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2, EDGE_WEIGHT).astype(np.float32)

    return np.outer(ramp(h), ramp(w))


@dataclass
class Band:
    """Rows ``[row0, row1)`` of level 0 of every output are final."""

    row0: int
    row1: int
    tiles_done: int
    tiles_total: int


@dataclass
class TiledOutput:
    """A zarr group holding one multiscale pyramid per output map."""

    path: Path
    names: list[str]
    shape: tuple[int, int]
    scale: tuple[float, float]

    def levels(self, name: str, mode: str = "r") -> list[zarr.Array]:
        """The zarr arrays ``[h_k, w_k]`` of map ``name``, level 0 (full size) first, opened with ``mode``."""
        import zarr

        group = zarr.open_group(str(self.path / name), mode=mode)
        n = int(group.attrs["mim_workbench"]["n_levels"])
        return [group[str(k)] for k in range(n)]


class ArgmaxLabels:
    """Class labels of K probability maps at one level, computed on read.

    ``1 + argmax`` over the maps (uint8; uint16 beyond 254 classes), 0 where no tile has
    been written yet (every map still holds its fill value 0).  Array-like enough for
    napari (``shape``, ``dtype``, ``ndim``, slicing, ``__array__``): a dense head's labels of
    a whole large image need no second store, and each refresh reads what the maps hold
    now, so the labels fill in band by band with the heat map.
    """

    def __init__(self, arrays: list[Any]) -> None:
        if not arrays:
            raise ValueError("ArgmaxLabels needs at least one probability map")
        shapes = {tuple(a.shape) for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"probability maps of one level differ in shape: {sorted(shapes)}")
        self.arrays = list(arrays)
        self.shape = tuple(arrays[0].shape)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.dtype = np.dtype(np.uint8 if len(arrays) < 255 else np.uint16)

    def __getitem__(self, key: Any) -> np.ndarray:
        probs = np.stack([np.asarray(a[key], dtype=np.float32) for a in self.arrays])
        labels = (probs.argmax(axis=0) + 1).astype(self.dtype)
        labels[probs.max(axis=0) <= 0] = 0
        return labels

    def __array__(self, dtype: npt.DTypeLike = None, copy: bool | None = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def argmax_labels(output: TiledOutput, names: list[str]) -> list[ArgmaxLabels]:
    """One :class:`ArgmaxLabels` per level of ``output``'s maps ``names`` (label k = names[k-1])."""
    per_name = [output.levels(n) for n in names]
    return [ArgmaxLabels([levels[k] for levels in per_name]) for k in range(len(per_name[0]))]


def band_rows(tile_rows: int, overlap: float) -> int:
    """Rows between tile rows (the stride) -- the height of every band but the last."""
    return max(1, int(round(tile_rows * (1 - overlap))))


def create_output(path: str | Path, names: list[str], shape: tuple[int, int], *, scale: tuple[float, float],
                  chunk: int = 512, min_side: int = 256, attrs: dict[str, Any] | None = None,
                  chunk_rows: int | None = None) -> TiledOutput:
    """An empty output group: ``<path>/<name>/<level>`` float32 arrays (OME-NGFF multiscales per name).

    ``chunk_rows``: chunk height of level 0 (level k: about ``chunk_rows / 2**k``, at
    least 16); pass :func:`band_rows` of the run so bands are written as whole chunks.
    """
    import zarr

    path = Path(path)
    root = zarr.open_group(str(path), mode="w")
    shapes = level_shapes(shape, min_side)
    for name in names:
        g = root.create_group(name)
        if chunk_rows is None:
            create_levels(g, shapes, np.float32, chunk=chunk, fill_value=0.0)
        else:
            for k, (h, w) in enumerate(shapes):
                rows = min(h, max(16 if k else 1, -(-int(chunk_rows) // 2 ** k)))
                g.create_array(str(k), shape=(h, w), dtype=np.float32, chunks=(rows, min(chunk, w)), fill_value=0.0)
        g.attrs["multiscales"] = ngff_multiscales(shapes, scale, name=name)
        g.attrs["mim_workbench"] = {"n_levels": len(shapes), "complete": False}
    root.attrs["mim_workbench"] = json.loads(json.dumps(attrs or {}, default=str))
    return TiledOutput(path=path, names=list(names), shape=(int(shape[0]), int(shape[1])), scale=scale)


def run_tiled(read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, int], tile: tuple[int, int],
              fn: TileFn, out: TiledOutput, *, overlap: float = 0.25, batch_size: int = 8) -> Iterator[Band]:
    """Run ``fn`` on overlapping tiles of an image of ``shape`` and stream blended maps into ``out``.

    ``read_rows(r0, r1)`` returns image rows ``[r0, r1)`` (all columns, zero-padded
    below the image), ``[r1 - r0, W]`` or ``[r1 - r0, W, C]``.  ``fn(tiles [B, h,
    w(, C)], origins)`` returns ``({name: values [B, h, w]}, weight factor [B, h, w]
    or None)`` -- one factor shared by every output of ``out``.  Yields a :class:`Band` per finished tile row.
    Raises ``ValueError`` unless ``0 <= overlap < 1``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap!r}: must be in [0, 1)")
    H, W = shape
    th, tw = tile
    rows, cols = tile_starts(H, th, band_rows(th, overlap)), tile_starts(W, tw, band_rows(tw, overlap))
    total = len(rows) * len(cols)
    _fixed_mmap_threshold()
    band = _BandBuffer(out, shape, tile, band_rows(th, overlap))
    done = 0
    for j, r0 in enumerate(rows):
        strip = read_rows(r0, r0 + th)
        for b0 in range(0, len(cols), batch_size):
            cs = cols[b0:b0 + batch_size]
            values, factor = fn(np.stack([_cut(strip, c, tw) for c in cs]), [(r0, c) for c in cs])
            band.add(r0, cs, values, factor)
            done += len(cs)
        final_to = rows[j + 1] if j + 1 < len(rows) else H
        if final_to > band.base:
            row0 = band.flush(final_to)
            yield Band(row0=row0, row1=final_to, tiles_done=done, tiles_total=total)
    _mark_complete(out)


class _BandBuffer:
    """Weighted sums of the open rows of every output, flushed to zarr as rows become final.

    Fixed buffers for one band (a tile row plus the rows still open from the previous
    one), reused in place: reallocating them per band fragments the heap and RSS creeps.
    """

    def __init__(self, out: TiledOutput, shape: tuple[int, int], tile: tuple[int, int], stride: int) -> None:
        H, W = shape
        self.names, self.shape, self.tile = list(out.names), shape, tile
        self.window = blend_window(*tile)
        self.levels = {name: out.levels(name, mode="r+") for name in self.names}
        self.carry: dict[str, list[np.ndarray | None]] = {n: [None] * len(self.levels[n]) for n in self.names}
        cap = min(H, tile[0] + stride)
        self.num = {n: np.zeros((cap, W), np.float32) for n in self.names}
        self.den = np.zeros((cap, W), np.float32)          # one weight for every output
        self.base = 0                                      # image row of the buffers' first row

    def add(self, r0: int, cols: list[int], values: dict[str, np.ndarray], factor: np.ndarray | None) -> None:
        """Blend the tiles at ``(r0, c) for c in cols`` (their values and weight factors) into the band."""
        (H, W), (th, tw) = self.shape, self.tile
        hh = min(th, H - r0)
        o = r0 - self.base
        for k, c in enumerate(cols):
            ww = min(tw, W - c)
            wt = self.window[:hh, :ww] * (factor[k, :hh, :ww] if factor is not None else 1.0)
            self.den[o:o + hh, c:c + ww] += wt
            for n in self.names:
                self.num[n][o:o + hh, c:c + ww] += wt * values[n][k, :hh, :ww]

    def flush(self, final_to: int) -> int:
        """Write the rows ``[base, final_to)`` (final now) to every level; returns the old ``base``."""
        row0, k = self.base, final_to - self.base
        d = self.den[:k]
        for n in self.names:
            v = self.num[n][:k]
            np.divide(v, d, out=v, where=d > 0)  # in place; where no weight fell, the sum is 0 already
            self.levels[n][0][row0:final_to, :] = v
            _write_coarser(self.levels[n], self.carry[n], v, row0, at_end=final_to >= self.shape[0])
            _shift_up(self.num[n], k)
        _shift_up(self.den, k)
        del d
        _release_freed_memory()
        self.base = final_to
        return row0


def _mark_complete(out: TiledOutput) -> None:
    """Flag every map of ``out`` as written to the end (a reader can tell a finished run from a broken one)."""
    import zarr

    for n in out.names:
        g = zarr.open_group(str(out.path / n), mode="r+")
        g.attrs["mim_workbench"] = {**dict(g.attrs["mim_workbench"]), "complete": True}


def open_level(image: str | os.PathLike | Pyramid, level: int, *, keep_color: bool) -> Pyramid:
    """``image`` (a path, opened as a pyramid, or a :class:`Pyramid`) after checking it has ``level``.

    Raises :class:`~mim_workbench.errors.ConfigError` when ``level`` is not one of its levels.
    """
    pyr = image if isinstance(image, Pyramid) else open_pyramid(image, keep_color=keep_color)
    if not 0 <= level < len(pyr.levels):
        raise ConfigError(f"level={level}: the pyramid has levels 0..{len(pyr.levels) - 1}")
    return pyr


def stream_level(pyr: Pyramid, level: int, tile: tuple[int, int], fn: TileFn, out: TiledOutput, *,
                 net: torch.nn.Module, overlap: float, batch_size: int) -> Generator[Band, None, int]:
    """:func:`run_tiled` over the whole of ``pyr``'s ``level`` with the torch module ``net`` in eval mode.

    Yields each finished :class:`Band`; returns (as the generator's value) the number of
    tiles ``fn`` saw.  ``net``'s training mode is restored however the run ends.
    """
    H, W = pyr.level_shape(level)
    tiles = 0

    def counted(batch: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``fn`` on one batch, counting its tiles."""
        nonlocal tiles
        tiles += len(batch)
        return fn(batch, origins)

    was_training = net.training
    net.eval()
    try:
        yield from run_tiled(lambda r0, r1: pyr.read(level, (r0, r1), (0, W)), (H, W), tile, counted, out,
                             overlap=overlap, batch_size=batch_size)
    finally:
        net.train(was_training)
    return tiles


def drain(bands: Iterable[Band], on_band: Callable[[Band], None] | None) -> None:
    """Run a band generator to its end, showing ``on_band`` (when given) every band."""
    for band in bands:
        if on_band is not None:
            on_band(band)


def _shift_up(buf: np.ndarray, k: int) -> None:
    """Drop the first ``k`` rows of ``buf`` in place; the freed rows at the bottom become 0.

    Copied in blocks of at most ``k`` rows, which never overlap their source, so
    numpy needs no temporary copy of the band.
    """
    rest = buf.shape[0] - k
    i = 0
    while i < rest:
        j = min(i + k, rest)
        buf[i:j] = buf[i + k:j + k]
        i = j
    buf[max(rest, 0):] = 0


def _write_coarser(levels: list[Any], carry: list[np.ndarray | None], rows: np.ndarray, row0: int, *,
                   at_end: bool) -> None:
    """Level-0 rows ``[row0, row0 + len(rows))`` are final: write the coarser levels' rows they complete.

    Computed from ``rows`` in memory (2x2 means, as :func:`~mim_workbench.io.pyramid_build.downsample_into`
    on disk would).  ``carry[k]`` holds an unpaired last row of level ``k`` until the
    next band brings its partner; ``at_end``: these rows reach the bottom of the image
    (an odd last row is then averaged with itself, as the pyramid builder does).
    """
    cur, start = rows, row0
    for k in range(1, len(levels)):
        if carry[k - 1] is not None:
            cur = np.concatenate([carry[k - 1][None], cur])
            start -= 1
            carry[k - 1] = None
        n = cur.shape[0]
        if n % 2 and not at_end:
            carry[k - 1] = cur[-1].copy()
            cur = cur[:-1]
            n -= 1
        if n == 0:
            return
        m = mean2x2(cur)
        a = start // 2
        levels[k][a:a + m.shape[0], :] = m
        cur, start = m, a


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    Why: every band frees several MB of zarr/codec buffers; glibc keeps them in its
    arenas, so resident memory would creep up over a long run although nothing leaks.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
_mmap_fixed = False

#: Allocations at least this large are served by their own mmap and unmapped when freed.
MMAP_THRESHOLD = 128 * 1024


def _fixed_mmap_threshold() -> None:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD` (process-wide, once; glibc only).

    Why: glibc raises the threshold (up to 32 MB) each time a large mmapped block
    is freed, after which band-sized buffers, zarr chunks and codec buffers come
    from the heaps of whichever threads allocate them (zarr's I/O and codec
    threads each get an arena) and stay resident as fragmentation.  Measured on a
    5000x4000 run: resident memory crept by ~20 MB over 30 bands and peaked 25 MB
    higher; with the threshold pinned it stays flat.  The cost is one mmap/munmap
    per large allocation, noise next to a tile batch.
    """
    global _mmap_fixed
    if _mmap_fixed:
        return
    _mmap_fixed = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _cut(strip: np.ndarray, c: int, tw: int) -> np.ndarray:
    piece = strip[:, c:c + tw]
    if piece.shape[1] < tw:  # image narrower than a tile: zero-pad on the right
        pad = [(0, 0), (0, tw - piece.shape[1])] + [(0, 0)] * (piece.ndim - 2)
        piece = np.pad(piece, pad)
    return piece


def tiles_to_tensor(tiles: np.ndarray, in_chans: int, device: str | torch.device) -> torch.Tensor:
    """A batch of tiles ``[B, h, w(, C)]`` as a float tensor ``[B, in_chans, h, w]`` on ``device``
    (colour averaged to grey and repeated when the model's channels differ)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(tiles)).float()
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t[:, None]
    if t.shape[1] != in_chans:
        t = t.mean(dim=1, keepdim=True)
        t = t.expand(-1, in_chans, -1, -1) if in_chans != 1 else t
    return t.contiguous().to(device)
