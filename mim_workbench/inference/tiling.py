"""Overlapping tiles with blending, streamed band by band into a zarr pyramid.

Whole-image inference on a mammogram or slide cannot hold the image, let alone
float32 maps of it, in memory.  :func:`run_tiled` walks a ``tile``-sized window
over one level in rows of tiles with ``overlap``; every tile's outputs are
accumulated with a smooth window weight (``sin²`` ramps, so seams vanish) into
an in-memory *band* only as tall as one tile plus one stride.  When a tile row
is done, the rows no later tile can touch are final: they are divided by their
weight, written to each output's zarr level 0, the coarser levels of those rows
are refreshed from disk, and a :class:`Band` is yielded -- a GUI can repaint a
multiscale layer while the run goes on.  Memory: O(tile height x image width).

Each output map is blended as ``sum(w * v) / sum(w)`` where the tile function
returns the values ``v`` and, optionally, one per-pixel weight factor (e.g. "count
this prediction fully where the pixel was masked, barely where it was visible").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mim_workbench.io.pyramid import create_levels, downsample_into, level_shapes, ngff_multiscales

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

    def levels(self, name: str, mode: str = "r") -> list[Any]:
        import zarr

        group = zarr.open_group(str(self.path / name), mode=mode)
        n = int(group.attrs["mim_workbench"]["n_levels"])
        return [group[str(k)] for k in range(n)]


def create_output(path: str | Path, names: list[str], shape: tuple[int, int], *, scale: tuple[float, float],
                  chunk: int = 512, min_side: int = 256, attrs: dict[str, Any] | None = None) -> TiledOutput:
    """An empty output group: ``<path>/<name>/<level>`` float32 arrays (OME-NGFF multiscales per name)."""
    import zarr

    path = Path(path)
    root = zarr.open_group(str(path), mode="w")
    shapes = level_shapes(shape, min_side)
    for name in names:
        g = root.create_group(name)
        create_levels(g, shapes, np.float32, chunk=chunk, fill_value=0.0)
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
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap!r}: must be in [0, 1)")
    H, W = shape
    th, tw = tile
    sh, sw = max(1, int(round(th * (1 - overlap)))), max(1, int(round(tw * (1 - overlap))))
    rows, cols = tile_starts(H, th, sh), tile_starts(W, tw, sw)
    total = len(rows) * len(cols)
    window = blend_window(th, tw)
    levels = {name: out.levels(name, mode="r+") for name in out.names}
    # Fixed buffers for one band (a tile row plus the rows still open from the previous
    # one), reused in place: reallocating them per band fragments the heap and RSS creeps.
    cap = min(H, th + sh)
    num = {n: np.zeros((cap, W), np.float32) for n in out.names}
    den = np.zeros((cap, W), np.float32)                  # one weight for every output
    base = 0                                              # image row of the buffers' first row
    done = 0
    for j, r0 in enumerate(rows):
        strip = read_rows(r0, r0 + th)
        hh = min(th, H - r0)
        o = r0 - base
        for b0 in range(0, len(cols), batch_size):
            cs = cols[b0:b0 + batch_size]
            tiles = np.stack([_cut(strip, c, tw) for c in cs])
            values, factor = fn(tiles, [(r0, c) for c in cs])
            for k, c in enumerate(cs):
                ww = min(tw, W - c)
                wt = window[:hh, :ww] * (factor[k, :hh, :ww] if factor is not None else 1.0)
                den[o:o + hh, c:c + ww] += wt
                for n in out.names:
                    num[n][o:o + hh, c:c + ww] += wt * values[n][k, :hh, :ww]
            done += len(cs)
        final_to = rows[j + 1] if j + 1 < len(rows) else H
        if final_to > base:
            k = final_to - base
            d = den[:k]
            safe = np.where(d > 0, d, 1.0)
            for n in out.names:
                levels[n][0][base:final_to, :] = np.where(d > 0, num[n][:k] / safe, 0.0).astype(np.float32)
                _refresh_levels(levels[n], base, final_to)
                _shift_up(num[n], k)
            _shift_up(den, k)
            del d, safe
            _release_freed_memory()
            yield Band(row0=base, row1=final_to, tiles_done=done, tiles_total=total)
            base = final_to
    import zarr

    for n in out.names:
        g = zarr.open_group(str(out.path / n), mode="r+")
        g.attrs["mim_workbench"] = {**dict(g.attrs["mim_workbench"]), "complete": True}


def _shift_up(buf: np.ndarray, k: int) -> None:
    """Drop the first ``k`` rows of ``buf`` in place; the freed rows at the bottom become 0."""
    rest = buf.shape[0] - k
    if rest > 0:
        buf[:rest] = buf[k:].copy()
    buf[max(rest, 0):] = 0


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


def _cut(strip: np.ndarray, c: int, tw: int) -> np.ndarray:
    piece = strip[:, c:c + tw]
    if piece.shape[1] < tw:  # image narrower than a tile: zero-pad on the right
        pad = [(0, 0), (0, tw - piece.shape[1])] + [(0, 0)] * (piece.ndim - 2)
        piece = np.pad(piece, pad)
    return piece


def _refresh_levels(levels: list[Any], row0: int, row1: int) -> None:
    """Recompute the coarser levels' rows that depend on level-0 rows ``[row0, row1)``."""
    a, b = row0, row1
    for k in range(1, len(levels)):
        a, b = a // 2, math.ceil(b / 2)
        downsample_into(levels[k - 1], levels[k], rows=(a, b))
