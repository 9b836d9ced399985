"""Prediction maps of a whole large image, tile by tile, on disk (classifier or dense head).

    for band in iter_predict_tiled(ckpt, "mammo.dcm", out="pred.zarr", level=0):
        ...                          # rows band.row0:band.row1 of every map are written
    res = predict_tiled(ckpt, "mammo.dcm", out="pred.zarr")   # the same, run to the end

Like :mod:`.tiled_reconstruct`, the image is read from its pyramid at ``level``
and covered by overlapping tiles blended with ``sin²`` windows (:mod:`.tiling`);
every map is a float32 OME-Zarr multiscale pyramid under ``out``; memory stays at
one band of tiles, whatever the image size.

* **classifier** (finetune checkpoint): the image's class probabilities come from
  one letterboxed pass over a low level (as in training: the whole image); the map
  ``map`` is, per tile at ``level``, the head applied to every patch token for that
  class (``patch_logits``, see :mod:`.predict`) -- the predicted class, or ``cls``.
* **dense head**: one map per class (its probability), from
  :meth:`~mim_workbench.models.dense.DenseHead.prepare` /
  :meth:`~mim_workbench.models.dense.DenseHead.working_probs` on each tile, with
  the image channels z-scored by the *whole* image's statistics (from a low level),
  so tiles agree with each other.  Blended probabilities still sum to 1 per pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .reconstruct import CheckpointLike
from .tiling import (Band, TiledOutput, TileFn, band_rows, create_output, drain, open_level, stream_level,
                     tiles_to_tensor)

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from ..models.dense import DenseHead
    from .predict import Predictor

#: Longest side of the level the classifier's whole-image probabilities (and dense norms) come from.
GLOBAL_MAX_SIDE = 1024
#: Dense tiles span this many encoder tiles per side (their own internal tiling covers the rest).
DENSE_TILE_FACTOR = 4


@dataclass
class TiledPrediction:
    """What :func:`predict_tiled` wrote (``output``, one map per name in ``maps``) and a summary of it."""

    output: TiledOutput
    level: int
    tiles: int
    kind: str                                    # "classifier" | "dense"
    classes: list[str]
    maps: dict[str, str] = field(default_factory=dict)     # zarr group name -> what it holds
    record: dict[str, Any] = field(default_factory=dict)   # JSON-able summary (probs, label, map class, ...)


@dataclass
class _MapPlan:
    """What one run writes and how: map names, the tile size, the tile function and the net it runs."""

    names: list[str]
    maps: dict[str, str]                         # name -> what the map holds
    tile: tuple[int, int]
    fn: TileFn
    net: torch.nn.Module
    record: dict[str, Any]                       # what the plan adds to the run's record


def _predictor(checkpoint_or_predictor: CheckpointLike | Predictor | DenseHead,
               device: str | torch.device) -> Predictor | DenseHead:
    from ..models.dense import DenseHead
    from .predict import Predictor, _DenseCallable, load_predictor

    p = checkpoint_or_predictor
    if isinstance(p, _DenseCallable):
        return p.head
    if isinstance(p, (Predictor, DenseHead)):
        return p
    p = load_predictor(p, device=device)
    return p.head if isinstance(p, _DenseCallable) else p


def _safe(name: str) -> str:
    from .predict import _safe as safe

    return safe(name)


def _dense_plan(head: DenseHead, low: np.ndarray, shape: tuple[int, int], tile: int | None) -> _MapPlan:
    """One probability map per class, tiles z-scored by the whole image's statistics (from ``low``)."""
    from ..io.letterbox import resize_to

    th, tw = head.img_size
    side = tile or int(round(DENSE_TILE_FACTOR * max(th, tw) / max(head.config.scale, 1e-6)))
    if head.config.mode == "letterbox":
        side = tile or max(th, tw)  # a letterboxed tile of the encoder's size is the tile itself
    grey = low if low.ndim == 2 else low[..., :3].mean(axis=-1)
    norm = (float(grey.mean()), float(grey.std()))
    classes = list(head.classes)
    names = [_safe(c) for c in classes]
    if len(set(names)) != len(names):
        names = [f"{k + 1}_{n}" for k, n in enumerate(names)]
    maps = {n: f"probability of {c}" for n, c in zip(names, classes)}
    H, W = shape
    tile_hw = (int(side), int(side)) if side else (th, tw)
    tile_hw = (min(tile_hw[0], max(H, th)), min(tile_hw[1], max(W, tw)))  # no bigger than the image needs

    def fn(tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], None]:
        """Each class's probabilities ``[B, h, w]`` for tiles ``[B, h, w(, C)]``; no weight factor."""
        outs = np.empty((len(classes), len(tiles)) + tiles.shape[1:3], np.float32)
        for b, t in enumerate(tiles):
            probs = head.working_probs(head.prepare(t, norm=norm)).numpy()    # [K, h', w'] working pixels
            if probs.shape[1:] != t.shape[:2]:
                probs = np.stack([resize_to(p, t.shape[:2], order=1) for p in probs])
            outs[:, b] = probs
        return {n: outs[j] for j, n in enumerate(names)}, None

    return _MapPlan(names, maps, tile_hw, fn, head.net, {"norm": list(norm), "maps": maps})


def _classifier_plan(pred: Predictor, low: np.ndarray, cls: str | None, tile: int | None) -> _MapPlan:
    """One map of ``cls``'s patch logits (default: the class predicted for the whole image ``low``)."""
    classes = list(pred.classes)
    th, tw = (int(v) for v in pred.model_config.encoder.img_size)
    if cls is not None and cls not in classes:
        raise ConfigError(f"class {cls!r}: the classifier knows {', '.join(classes)}")
    whole = pred(low, map="patch_logits")         # the image as the classifier was trained to see it
    k = classes.index(cls) if cls is not None else whole.index
    maps = {"map": f"patch logit of {classes[k]}"}
    in_chans, dev = int(pred.model_config.encoder.in_chans), pred.device

    def fn(tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], None]:
        """Class ``k``'s patch logits, bilinearly upsampled to ``[B, h, w]`` pixels; no weight factor."""
        x = tiles_to_tensor(tiles, in_chans, dev)
        grid = pred.model.patch_logits(x)[:, k:k + 1].float()                 # [B, 1, gh, gw]
        up = F.interpolate(grid, size=tiles.shape[1:3], mode="bilinear", align_corners=False)
        return {"map": up[:, 0].cpu().numpy()}, None

    record = {"label": whole.label, "probs": {c: float(p) for c, p in zip(classes, whole.probs)},
              "map_kind": "patch_logits", "map_class": classes[k], "maps": maps}
    return _MapPlan(["map"], maps, (int(tile), int(tile)) if tile else (th, tw), fn, pred.model, record)


def _map_summary(output: TiledOutput, plan: _MapPlan, classes: list[str], dense: bool) -> dict[str, Any]:
    """From the coarsest level: each class's winning share and mean probability (dense), or the map's range."""
    if dense:
        coarse = np.stack([np.asarray(output.levels(n)[-1][...]) for n in plan.names])
        win = coarse.argmax(axis=0)
        return {"label_fraction": {c: float((win == j).mean()) for j, c in enumerate(classes)},
                "mean_prob": {c: float(coarse[j].mean()) for j, c in enumerate(classes)}}
    coarse = np.asarray(output.levels("map")[-1][...])
    return {"map_range": [float(coarse.min()), float(coarse.max())]}


@torch.no_grad()
def iter_predict_tiled(
    checkpoint_or_predictor: CheckpointLike | Predictor | DenseHead,
    image: str | os.PathLike | Pyramid,
    *,
    out: str | os.PathLike,
    level: int = 0,
    cls: str | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
    tile: int | None = None,
    device: str | torch.device = "cpu",
    stats: dict[str, Any] | None = None,
) -> Iterator[Band]:
    """Generator form of :func:`predict_tiled`: yields each finished band of rows.

    ``image``: a path or a :class:`~mim_workbench.io.pyramid.Pyramid`.  ``cls``: the
    class whose map a classifier writes (default: the predicted one).  ``tile``:
    tile side in pixels of ``level`` (default: the encoder's input size for a
    classifier, ``DENSE_TILE_FACTOR`` encoder tiles for a dense head).  ``stats``
    receives ``output`` before the first band, the rest when the run ends.  Raises
    ConfigError for a level the pyramid lacks or a class the classifier does not know.
    """
    from ..models.dense import DenseHead

    pred = _predictor(checkpoint_or_predictor, device)
    dense = isinstance(pred, DenseHead)
    pyr = open_level(image, level, keep_color=int(pred.model_config.encoder.in_chans) == 3)
    H, W = pyr.level_shape(level)
    low = pyr.read_level(pyr.level_for_max_side(GLOBAL_MAX_SIDE))
    classes = list(pred.classes)
    record: dict[str, Any] = {"kind": "dense" if dense else "classifier", "classes": classes, "level": level,
                              "overlap": overlap}
    plan = _dense_plan(pred, low, (H, W), tile) if dense else _classifier_plan(pred, low, cls, tile)
    record.update(plan.record)
    output = create_output(out, plan.names, (H, W), scale=pyr.scale(level), attrs={
        "source": pyr.meta.source, "level": level, "overlap": overlap, "tile": list(plan.tile), **record},
        chunk_rows=band_rows(plan.tile[0], overlap))
    if stats is not None:  # before the first band: a GUI opens the maps while they are being written
        stats["output"] = output
    tiles = yield from stream_level(pyr, level, plan.tile, plan.fn, output, net=plan.net, overlap=overlap,
                                    batch_size=batch_size)
    record.update(_map_summary(output, plan, classes, dense))
    record.update(tiles=tiles, shape=[H, W], scale=list(output.scale), output=str(output.path))
    if stats is not None:
        stats.update(level=level, tiles=tiles, kind=record["kind"], classes=classes, maps=plan.maps, record=record)


def predict_tiled(checkpoint_or_predictor: CheckpointLike | Predictor | DenseHead, image: str | os.PathLike | Pyramid,
                  *, out: str | os.PathLike, on_band: Callable[[Band], None] | None = None,
                  **options: Any) -> TiledPrediction:
    """Run :func:`iter_predict_tiled` (``options`` are its keywords) to the end; ``on_band`` sees every band."""
    stats: dict[str, Any] = {}
    drain(iter_predict_tiled(checkpoint_or_predictor, image, out=out, stats=stats, **options), on_band)
    return TiledPrediction(output=stats["output"], level=stats["level"], tiles=stats["tiles"], kind=stats["kind"],
                           classes=stats["classes"], maps=stats["maps"], record=stats["record"])


def save_tiled_prediction(result: TiledPrediction, out_dir: str | Path, stem: str) -> list[Path]:
    """``predictions.json`` and a heat-map PNG per map of the coarsest level (``<stem>_<map>.png``)."""
    import json

    from .predict import _unit
    from ..io.meta import json_safe
    from .reconstruct import _write_rgb, heat

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in result.maps:
        coarse = np.asarray(result.output.levels(name)[-1][...])
        files.append(_write_rgb(out / f"{stem}_{name}.png",
                                heat(np.clip(coarse, 0, 1) if result.kind == "dense" else _unit(coarse))))
    record = {**result.record, "files": [f.name for f in files]}
    path = out / "predictions.json"
    path.write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
    return [path, *files]


__all__ = ["TiledPrediction", "iter_predict_tiled", "predict_tiled", "save_tiled_prediction"]
