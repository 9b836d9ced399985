"""Large images as napari multiscale layers (pyramids from :mod:`mim_workbench.io.pyramid`).

The reader hands napari the pyramid's levels as dask arrays over the zarr store,
finest first, with ``multiscale=True``: napari reads only the tiles on screen at
the level that matches the zoom, so a 30000² slide opens in well under a second
and memory does not grow with the image.  ``scale`` is level 0's pixel size (mm
from DICOM ``ImagerPixelSpacing``/``PixelSpacing`` or TIFF resolution).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mim_workbench.io.pyramid import PYRAMID_THRESHOLD_PIXELS, Pyramid, open_pyramid

if TYPE_CHECKING:
    import napari

LayerData = tuple[Any, dict, str]

#: Single-scale image layers with more pixels than this are reconstructed / predicted tile by tile too.
TILED_THRESHOLD_PIXELS: int = PYRAMID_THRESHOLD_PIXELS


def pyramid_layer_data(pyr: Pyramid, *, name: str | None = None) -> LayerData:
    """(levels, kwargs, "image") for ``viewer._add_layer_from_data`` / a reader."""
    meta = pyr.meta
    kwargs: dict[str, Any] = {
        "name": name or Path(meta.source).stem,
        "scale": tuple(pyr.scale(0)),
        "multiscale": True,
        "rgb": pyr.color,
        "metadata": {
            "mim_workbench": meta.to_dict(),
            "source": meta.source,
            "mim_workbench_pyramid": {
                "store": str(pyr.store) if pyr.store else None,
                "built": pyr.built,
                "window": list(pyr.window),
                "levels": [list(pyr.level_shape(k)) for k in range(len(pyr.levels))],
            },
        },
    }
    if not pyr.color:
        kwargs.update(colormap="gray", contrast_limits=tuple(float(v) for v in pyr.window))
    return pyr.dask_levels(), kwargs, "image"


def read_pyramid_layer(path: str | Path) -> LayerData:
    """Open (building and caching when needed) and wrap one large image; colour kept for slides."""
    return pyramid_layer_data(open_pyramid(path, keep_color=True))


def layer_level_for_max_side(layer: napari.layers.Image, max_side: int
                             ) -> tuple[int, tuple[int, int], tuple[float, float]]:
    """(level, (h, w), napari scale) of the finest level of an image layer whose longest side is <= ``max_side``.

    Why: masks and strokes painted on a multiscale image live at a reduced level (a
    30000² Labels layer would not fit in memory); with this level's scale they lie
    exactly on the image, and the core resamples them to any other level.  The
    coarsest level when none fits; level 0 of a single-scale layer.
    """
    sy, sx = (float(v) for v in layer.scale[-2:])
    if not layer.multiscale:
        h, w = (int(v) for v in layer.data.shape[:2])
        return 0, (h, w), (sy, sx)
    levels = list(layer.data)
    h0, w0 = (int(v) for v in levels[0].shape[:2])
    pick = next((k for k, a in enumerate(levels) if max(a.shape[:2]) <= max_side), len(levels) - 1)
    h, w = (int(v) for v in levels[pick].shape[:2])
    return pick, (h, w), (sy * h0 / h, sx * w0 / w)


def layer_pyramid(layer: napari.layers.Image) -> Pyramid:
    """The layer's own arrays (file-backed or in memory) as a :class:`Pyramid`, scale = the layer's."""
    from mim_workbench.io.pyramid import pyramid_from_arrays

    levels = list(layer.data) if layer.multiscale else [layer.data]
    window = (layer.metadata.get("mim_workbench_pyramid") or {}).get("window")
    return pyramid_from_arrays(levels, scale=tuple(layer.scale[-2:]), window=tuple(window) if window else None,
                               source=str(layer.metadata.get("source") or layer.name))


def wants_tiled(layer: napari.layers.Image) -> bool:
    """Multiscale layers, and single-scale ones above :data:`TILED_THRESHOLD_PIXELS`, go tile by tile."""
    if layer.multiscale:
        return True
    shape = layer.data.shape[:2]
    return int(shape[0]) * int(shape[1]) > TILED_THRESHOLD_PIXELS


def tiled_root(kind: str) -> Path:
    """Where a dock writes tiled maps: ``$MIM_WORKBENCH_CACHE/<kind>`` (else ``~/.cache/mim-workbench/<kind>``)."""
    from mim_workbench.io.cache import cache_base

    root = cache_base() / kind
    root.mkdir(parents=True, exist_ok=True)
    return root


#: Maps older than this in a tiled root belong to no open viewer (a crashed or killed session).
STALE_AFTER_S = 3 * 24 * 3600.0


class ScratchMaps:
    """The tiled output maps (zarr folders) one dock writes for its layers to read.

    They are scratch: a map is removed as soon as a newer one for the same image
    replaces its layers, the rest when the dock or the viewer closes (``clear``), and
    maps that a crashed session left behind are removed at the next start once they are
    older than :data:`STALE_AFTER_S`.  A map still being written when that happens stops
    at its next band and is removed then (``stream``).  Saving a layer writes a copy elsewhere.
    """

    def __init__(self, kind: str) -> None:
        self.root = tiled_root(kind)
        self.shown: dict[str, Path] = {}   # image name -> the map its layers read now
        self.closed = False                # the dock or the viewer is closing: no new bands
        self.prune_stale()
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.clear)

    def new(self) -> Path:
        """A fresh map folder name (the writer creates it)."""
        import uuid

        return self.root / f"{uuid.uuid4().hex}.zarr"

    def show(self, image_name: str, path: Path) -> None:
        """``path`` now backs ``image_name``'s layers: the map it replaces goes."""
        old = self.shown.get(image_name)
        self.shown[image_name] = Path(path)
        if old is not None and old != Path(path):
            _remove(old)

    def clear(self, *_: Any) -> None:
        """Remove every map shown and mark the maps closed, so a map being streamed stops at its next band."""
        self.closed = True
        for path in self.shown.values():
            _remove(path)
        self.shown.clear()

    def stream(self, out: Path, tiled: Callable[[dict[str, Any]], Iterator[Any]]
               ) -> Generator[tuple[Any, Any], None, dict[str, Any] | None]:
        """Run the tiled writer ``tiled(stats)`` filling ``out``: yields ``(band, output)`` (the
        map being written) until the maps are cleared, and returns the writer's ``stats``.

        Once cleared, the writer is closed at its next band, ``out`` removed and None
        returned, so closing the viewer mid-prediction neither waits for the whole image
        nor leaves a partial map.
        """
        stats: dict[str, Any] = {}
        bands = tiled(stats)
        try:
            for band in bands:
                if self.closed:
                    break
                yield band, stats.get("output")
        finally:
            close = getattr(bands, "close", None)
            if close is not None:
                close()
            if self.closed:
                _remove(out)
        return None if self.closed else stats

    def start(self, work: Callable[[], Generator[tuple[Any, Any], None, Any]], *,
              on_band: Callable[[tuple[Any, Any]], None], on_done: Callable[[Any], None],
              on_error: Callable[[Exception], None], on_finished: Callable[[], None]) -> Any:
        """Start ``work`` (a generator of ``(band, output)``, e.g. :meth:`stream`) in a worker; each
        band reaches ``on_band`` on the GUI thread unless the maps were cleared meanwhile (a band
        sent just before the dock or the viewer closed: its map is gone)."""
        from ._status import start_job

        def show(item: tuple[Any, Any]) -> None:
            if not self.closed:
                on_band(item)

        return start_job(work, on_yield=show, on_done=on_done, on_error=on_error, on_finished=on_finished)

    def prune_stale(self, now: float | None = None) -> list[Path]:
        """Remove the root's maps last modified over :data:`STALE_AFTER_S` before ``now`` (seconds since the
        epoch, default the current time); returns the maps removed. Unreadable entries are skipped."""
        import time

        now = time.time() if now is None else now
        gone = []
        for entry in self.root.glob("*.zarr"):
            try:
                old = now - entry.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
            if old:
                _remove(entry)
                gone.append(entry)
        return gone


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
