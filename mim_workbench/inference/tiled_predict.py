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
  :meth:`~mim_workbench.training.dense.DenseHead.prepare` /
  :meth:`~mim_workbench.training.dense.DenseHead.working_probs` on each tile, with
  the image channels z-scored by the *whole* image's statistics (from a low level),
  so tiles agree with each other.  Blended probabilities still sum to 1 per pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .tiling import Band, TiledOutput, band_rows, create_output, run_tiled, tiles_to_tensor

#: Longest side of the level the classifier's whole-image probabilities (and dense norms) come from.
GLOBAL_MAX_SIDE = 1024
#: Dense tiles span this many encoder tiles per side (their own internal tiling covers the rest).
DENSE_TILE_FACTOR = 4


@dataclass
class TiledPrediction:
    output: TiledOutput
    level: int
    tiles: int
    kind: str                                    # "classifier" | "dense"
    classes: list[str]
    maps: dict[str, str] = field(default_factory=dict)     # zarr group name -> what it holds
    record: dict[str, Any] = field(default_factory=dict)   # JSON-able summary (probs, label, map class, ...)


def _predictor(checkpoint_or_predictor: Any, device: str | torch.device) -> Any:
    from ..training.dense import DenseHead
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


@torch.no_grad()
def iter_predict_tiled(
    checkpoint_or_predictor: Any,
    image: Any,
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
    receives ``output`` before the first band, the rest when the run ends.
    """
    from ..io.pyramid import Pyramid, open_pyramid
    from ..training.dense import DenseHead

    pred = _predictor(checkpoint_or_predictor, device)
    dense = isinstance(pred, DenseHead)
    model_cfg = pred.model_config
    in_chans = int(model_cfg.in_chans)
    pyr = image if isinstance(image, Pyramid) else open_pyramid(image, keep_color=in_chans == 3)
    if not 0 <= level < len(pyr.levels):
        raise ConfigError(f"level={level}: the pyramid has levels 0..{len(pyr.levels) - 1}")
    H, W = pyr.level_shape(level)
    low = pyr.read_level(pyr.level_for_max_side(GLOBAL_MAX_SIDE))
    classes = list(pred.classes)
    record: dict[str, Any] = {"kind": "dense" if dense else "classifier", "classes": classes, "level": level,
                              "overlap": overlap}
    if dense:
        th, tw = pred.img_size
        side = tile or int(round(DENSE_TILE_FACTOR * max(th, tw) / max(pred.config.scale, 1e-6)))
        if pred.config.mode == "letterbox":
            side = tile or max(th, tw)  # a letterboxed tile of the encoder's size is the tile itself
        grey = low if low.ndim == 2 else low[..., :3].mean(axis=-1)
        norm = (float(grey.mean()), float(grey.std()))
        names = [_safe(c) for c in classes]
        if len(set(names)) != len(names):
            names = [f"{k + 1}_{n}" for k, n in enumerate(names)]
        maps = {n: f"probability of {c}" for n, c in zip(names, classes)}
        record.update(norm=list(norm), maps=maps)
    else:
        th, tw = (int(v) for v in model_cfg.img_size)
        side = tile
        if cls is not None and cls not in classes:
            raise ConfigError(f"class {cls!r}: the classifier knows {', '.join(classes)}")
        whole = pred(low, map="patch_logits")         # the image as the classifier was trained to see it
        k = classes.index(cls) if cls is not None else whole.index
        names = ["map"]
        maps = {"map": f"patch logit of {classes[k]}"}
        record.update(label=whole.label, probs={c: float(p) for c, p in zip(classes, whole.probs)},
                      map_kind="patch_logits", map_class=classes[k], maps=maps)
    tile_hw = (int(side), int(side)) if side else (th, tw)
    if dense:
        tile_hw = (min(tile_hw[0], max(H, th)), min(tile_hw[1], max(W, tw)))  # no bigger than the image needs
    output = create_output(out, names, (H, W), scale=pyr.scale(level), attrs={
        "source": pyr.meta.source, "level": level, "overlap": overlap, "tile": list(tile_hw), **record},
        chunk_rows=band_rows(tile_hw[0], overlap))
    if stats is not None:  # before the first band: a GUI opens the maps while they are being written
        stats["output"] = output
    counted = {"tiles": 0}

    if dense:
        from ..io.letterbox import resize_to

        def fn(tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], None]:
            outs = np.empty((len(classes), len(tiles)) + tiles.shape[1:3], np.float32)
            for b, t in enumerate(tiles):
                probs = pred.working_probs(pred.prepare(t, norm=norm)).numpy()    # [K, h', w'] working pixels
                if probs.shape[1:] != t.shape[:2]:
                    probs = np.stack([resize_to(p, t.shape[:2], order=1) for p in probs])
                outs[:, b] = probs
            counted["tiles"] += len(tiles)
            return {n: outs[j] for j, n in enumerate(names)}, None
    else:
        dev = pred.device

        def fn(tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], None]:
            x = tiles_to_tensor(tiles, in_chans, dev)
            grid = pred.model.patch_logits(x)[:, k:k + 1].float()                 # [B, 1, gh, gw]
            up = F.interpolate(grid, size=tiles.shape[1:3], mode="bilinear", align_corners=False)
            counted["tiles"] += len(tiles)
            return {"map": up[:, 0].cpu().numpy()}, None

    net = pred.net if dense else pred.model
    was = net.training
    net.eval()
    try:
        yield from run_tiled(lambda r0, r1: pyr.read(level, (r0, r1), (0, W)), (H, W), tile_hw, fn, output,
                             overlap=overlap, batch_size=batch_size)
    finally:
        net.train(was)
    if dense:  # share of the image each class wins and its mean probability, from the coarsest level
        coarse = np.stack([np.asarray(output.levels(n)[-1][...]) for n in names])
        win = coarse.argmax(axis=0)
        record.update(label_fraction={c: float((win == j).mean()) for j, c in enumerate(classes)},
                      mean_prob={c: float(coarse[j].mean()) for j, c in enumerate(classes)})
    else:
        coarse = np.asarray(output.levels("map")[-1][...])
        record.update(map_range=[float(coarse.min()), float(coarse.max())])
    record.update(tiles=counted["tiles"], shape=[H, W], scale=list(output.scale), output=str(output.path))
    if stats is not None:
        stats.update(level=level, tiles=counted["tiles"], kind=record["kind"], classes=classes, maps=maps,
                     record=record)


def predict_tiled(checkpoint_or_predictor: Any, image: Any, *, out: str | os.PathLike,
                  on_band: Callable[[Band], None] | None = None, **options: Any) -> TiledPrediction:
    """Run :func:`iter_predict_tiled` to the end; ``on_band`` sees every finished band."""
    stats: dict[str, Any] = {}
    for band in iter_predict_tiled(checkpoint_or_predictor, image, out=out, stats=stats, **options):
        if on_band is not None:
            on_band(band)
    return TiledPrediction(output=stats["output"], level=stats["level"], tiles=stats["tiles"], kind=stats["kind"],
                           classes=stats["classes"], maps=stats["maps"], record=stats["record"])


def save_tiled_prediction(result: TiledPrediction, out_dir: str | Path, stem: str) -> list[Path]:
    """``predictions.json`` and a heat-map PNG per map of the coarsest level (``<stem>_<map>.png``)."""
    import json

    from .predict import _unit
    from .reconstruct import _write_rgb, heat, json_safe

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
