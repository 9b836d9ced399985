"""Predictions for overlays: class probabilities + a spatial map, or dense probability maps.

    pred = predict("runs/finetune", "xray.png")       # a finetune checkpoint -> Prediction
    pred.probs, pred.label, pred.map                  # [K], str, [H, W] on the image's grid
    dense = predict("runs/dense", "pano.png")         # a dense checkpoint -> DensePrediction
    dense.probs, dense.labels                         # [K, H, W], [H, W] (1..K)

For many images, load once: ``p = load_predictor(ckpt); p(image)``.

The classifier sees the image letterboxed to its training size (aspect kept,
padded bottom/right with 0, as in training).  Its spatial map (``map=``):

``"patch_logits"``
    the head applied to every patch token, for the predicted class.  For a
    model that pools by averaging (the default, probe or full) the image logit is
    exactly the mean of this map: a class-activation map.  For a probe on the
    class token it uses the BatchNorm statistics of the class token, an approximation.
``"rollout"``
    attention rollout from the class token (Abnar & Zuidema), in [0, 1].
``"auto"`` (default)
    patch logits when the model pools by averaging, rollout when it reads the
    class token.

The map is upsampled bilinearly from the patch grid to the letterbox canvas,
cropped to the content and resized to the source image, so it overlays the
image pixel for pixel.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..io.model_input import as_unit_array, to_channels
from ..io.meta import json_safe
from .reconstruct import _write_rgb, heat

if TYPE_CHECKING:
    from ..io.letterbox import Letterbox
    from ..models.dense import DenseHead, DensePrediction
    from .reconstruct import CheckpointLike, ImageLike

MAP_KINDS = ("auto", "patch_logits", "rollout")


@dataclass
class Prediction:
    """Class probabilities of one image and a spatial map on its grid."""

    classes: list[str]
    probs: np.ndarray                 # [K] float32
    map: np.ndarray                   # [H, W] float32 on the source image's grid
    map_kind: str                     # "patch_logits" | "rollout"
    map_class: str                    # the class the map is for (the predicted one)
    patch_map: np.ndarray             # [gh, gw] the map on the patch grid
    letterbox: Letterbox | None = field(repr=False, default=None)   # canvas -> source mapping

    @property
    def index(self) -> int:
        """Index into ``classes`` of the most probable class."""
        return int(np.argmax(self.probs))

    @property
    def label(self) -> str:
        """Name of the most probable class."""
        return self.classes[self.index]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: label, per-class probabilities, map kind, class, value range and shape."""
        return {"label": self.label, "probs": {c: float(p) for c, p in zip(self.classes, self.probs)},
                "map_kind": self.map_kind, "map_class": self.map_class,
                "map_range": [float(self.map.min()), float(self.map.max())], "shape": list(self.map.shape)}

    def save(self, out_dir: str | Path, stem: str) -> list[Path]:
        """Write ``<stem>_map.tif`` (float32, raw values) and ``<stem>_map.png`` (heat map, min-max scaled)
        into ``out_dir`` (created if missing); returns the two paths."""
        import tifffile

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tif = out / f"{stem}_map.tif"
        tifffile.imwrite(tif, self.map.astype(np.float32))
        png = _write_rgb(out / f"{stem}_map.png", heat(_unit(self.map)))
        return [tif, png]


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def save_dense(pred: DensePrediction, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>_probs.tif`` ([K, H, W] float32), ``<stem>_labels.png`` (1..K) and one heat PNG per class
    (``<stem>_<class>.png``) into ``out_dir`` (created if missing); returns the paths in that order."""
    import tifffile
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}_probs.tif", out / f"{stem}_labels.png"]
    tifffile.imwrite(paths[0], pred.probs.astype(np.float32), metadata={"axes": "CYX", "classes": pred.classes})
    Image.fromarray(pred.labels).save(paths[1])
    for k, name in enumerate(pred.classes):
        paths.append(_write_rgb(out / f"{stem}_{_safe(name)}.png", heat(pred.probs[k])))
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "class"


def dense_summary(pred: DensePrediction) -> dict[str, Any]:
    """Share of pixels assigned to each class (argmax), the mean probability per class (both keyed by
    class name, in [0, 1]) and the map's ``[H, W]`` shape, as a JSON-able dict."""
    lab = pred.labels
    n = lab.size
    return {"label_fraction": {c: float((lab == k + 1).sum() / n) for k, c in enumerate(pred.classes)},
            "mean_prob": {c: float(pred.probs[k].mean()) for k, c in enumerate(pred.classes)},
            "shape": list(lab.shape)}


class Predictor:
    """A fine-tuned classifier loaded once; call it on images."""

    def __init__(self, checkpoint: CheckpointLike, *, device: str | torch.device = "cpu") -> None:
        """Load a finetune checkpoint onto ``device`` in eval mode.  Raises CheckpointError for a missing or
        unreadable checkpoint, one of another kind, or metadata and weights that do not fit together."""
        from ..models import ModelConfig
        from ..models.classifier import Classifier
        from ..models.encoder import create_encoder
        from ..models.checkpoint import Checkpoint, load_checkpoint
        from ..models.classifier import FINETUNE_KIND
        from ..training.config import saved_finetune_values

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        if ckpt.kind != FINETUNE_KIND:
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind!r} checkpoint; predictions need a finetune "
                                  "(classifier) or dense checkpoint")
        meta = ckpt.meta
        try:
            model_cfg = ModelConfig.from_dict(meta["model_config"])
            self.classes = [str(c) for c in meta["classes"]]
            mode = str(meta["mode"])
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"{ckpt.path}: classifier metadata is incomplete ({exc})") from None
        dropout = float((meta.get("config") or {}).get("dropout") or 0.0)
        pool = saved_finetune_values({**(meta.get("config") or {}), "mode": mode})["pool"]
        model = Classifier(create_encoder(model_cfg), len(self.classes), mode, dropout=dropout, pool=pool)
        try:
            model.load_state_dict(ckpt.model_state(), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt.path}: weights do not fit the stored settings: {exc}") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model_config = model_cfg
        self.checkpoint = ckpt

    @torch.no_grad()
    def __call__(self, image: ImageLike, *, map: str = "auto") -> Prediction:
        """Class probabilities ``[K]`` and a ``map`` (one of MAP_KINDS) on ``image``'s grid.  Raises
        ConfigError for an unknown ``map`` or an image that is not 2-D / has non-finite values, and
        ReaderError for a path that cannot be read."""
        from ..io import letterbox

        if map not in MAP_KINDS:
            raise ConfigError(f"map={map!r}: choose one of {', '.join(MAP_KINDS)}")
        kind = map if map != "auto" else ("patch_logits" if self.model.pool == "avg" else "rollout")
        src = as_unit_array(image)
        H, W = self.model_config.encoder.img_size
        canvas, lb = letterbox(src, (H, W), order=1)
        x = torch.from_numpy(to_channels(canvas, self.model_config.encoder.in_chans)).float()[None].to(self.device)
        probs = self.model(x).float().softmax(-1)[0].cpu().numpy()
        k = int(np.argmax(probs))
        if kind == "patch_logits":
            grid = self.model.patch_logits(x)[:, k:k + 1].float()                   # [1, 1, gh, gw]
        else:
            grid = self.model.attention_rollout(x)[:, None].float()                 # [1, 1, gh, gw]
        up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        full = lb.restore(up, order=1).astype(np.float32)
        return Prediction(classes=list(self.classes), probs=probs.astype(np.float32), map=full, map_kind=kind,
                          map_class=self.classes[k], patch_map=grid[0, 0].cpu().numpy(), letterbox=lb)


def load_predictor(checkpoint: CheckpointLike, *, device: str | torch.device = "cpu") -> Predictor | _DenseCallable:
    """A callable ``image -> prediction`` for a finetune (:class:`Predictor`) or dense checkpoint
    (:class:`~mim_workbench.models.dense.DenseHead`, whose ``predict`` is also its call).  Raises
    CheckpointError for a missing or unreadable checkpoint or one of another kind."""
    from ..models.checkpoint import Checkpoint, load_checkpoint
    from ..models.dense import DENSE_KIND, DenseHead

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if ckpt.kind == DENSE_KIND:
        head = DenseHead.load(ckpt, device=device)
        return _DenseCallable(head)
    return Predictor(ckpt, device=device)


class _DenseCallable:
    """A dense head called like a :class:`Predictor` (the classifier's ``map=`` is ignored)."""

    def __init__(self, head: DenseHead) -> None:
        self.head = head
        self.classes = head.classes

    def __call__(self, image: ImageLike, **_: Any) -> DensePrediction:
        return self.head.predict(image)


def predict(checkpoint: CheckpointLike, image: ImageLike, *, device: str | torch.device = "cpu",
            map: str = "auto") -> Prediction | DensePrediction:
    """:class:`Prediction` (finetune checkpoint) or ``DensePrediction`` (dense checkpoint) of one image.
    Raises CheckpointError for an unusable checkpoint, ConfigError / ReaderError for an unusable image."""
    return load_predictor(checkpoint, device=device)(image, map=map)


# ====================================================================== folders
def image_list(path: str | Path) -> list[tuple[str, Path, str | None]]:
    """(id, path, known label) for an image file or a dataset folder (any layout ``discover`` reads)."""
    from ..io.datasets import discover

    p = Path(path)
    if p.is_file() and p.suffix.lower() not in (".csv", ".tsv"):
        return [(p.stem, p, None)]
    index = discover(p)
    return [(s.id, s.image, s.label) for s in index.samples]


def predict_folder(checkpoint: CheckpointLike, data: str | Path, out_dir: str | Path, *,
                   device: str | torch.device = "cpu", map: str = "auto", save_maps: bool = True) -> Path:
    """Predict every image of ``data``; writes ``predictions.csv`` (one row per image) and, with
    ``save_maps``, the maps into ``out_dir``; returns the CSV path.  Raises DatasetError for a folder or
    manifest it cannot index, otherwise as :func:`predict`."""
    predictor = load_predictor(checkpoint, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    dense = isinstance(predictor, _DenseCallable)
    for sid, path, truth in image_list(data):
        pred = predictor(path, map=map)
        stem = _safe(sid.replace("/", "__"))
        row: dict[str, Any] = {"id": sid, "image": str(path)}
        if dense:
            s = dense_summary(pred)
            row.update({f"fraction_{c}": s["label_fraction"][c] for c in pred.classes})
            row.update({f"mean_prob_{c}": s["mean_prob"][c] for c in pred.classes})
            if save_maps:
                save_dense(pred, out, stem)
        else:
            row.update({"true_label": truth or "", "predicted": pred.label})
            row.update({f"prob_{c}": float(p) for c, p in zip(pred.classes, pred.probs)})
            if save_maps:
                pred.save(out, stem)
        rows.append(row)
    csv_path = out / "predictions.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["id", "image"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


def predict_one(checkpoint: CheckpointLike, image: str | Path, out_dir: str | Path, *,
                device: str | torch.device = "cpu", map: str = "auto") -> Path:
    """Predict one image file; writes ``predictions.json`` and the maps into ``out_dir``; returns the JSON
    path.  Raises as :func:`predict`."""
    predictor = load_predictor(checkpoint, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = predictor(image, map=map)
    stem = _safe(Path(image).stem)
    record: dict[str, Any] = {"image": str(image)}
    if isinstance(predictor, _DenseCallable):
        record.update({"classes": pred.classes, **dense_summary(pred)})
        files = save_dense(pred, out, stem)
    else:
        record.update(pred.to_dict())
        files = pred.save(out, stem)
    record["files"] = [f.name for f in files]
    path = out / "predictions.json"
    path.write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
    return path


__all__ = ["MAP_KINDS", "Prediction", "Predictor", "dense_summary", "image_list", "load_predictor", "predict",
           "predict_folder", "predict_one", "save_dense"]
