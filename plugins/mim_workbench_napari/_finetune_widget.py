"""Fine-tune & predict dock: few labels in, predictions overlaid on the images.

Labels come from a dataset folder or CSV manifest, from image layers' metadata
(``layer.metadata["label"]``, set here with "Set label"), or from strokes painted
on a ``strokes: NAME`` Labels layer (dense head).  Training runs in a child process
like pretraining (:mod:`._background`); inputs that only exist in the viewer are
staged into the run folder first (:mod:`mim_workbench.io.staging`), so painted
strokes are on disk before training starts.

Predictions: a classifier gives class probabilities (dock text and the viewer's
text overlay) and a heat map ``heatmap: NAME``; a dense head gives a Labels layer
``dense: NAME`` and the heat map of its first class.  Large images (multiscale, or
above the tiling threshold) are predicted tile by tile into zarr maps: the heat map
is a multiscale layer that fills in while it runs (a dense head's labels layer is
not made for them: its per-class maps are in the zarr store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari  # the viewer annotation must resolve: napari injects it by type
import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSlider, LineEdit, ProgressBar, PushButton,
                              SpinBox)

# Imported on the main thread (see _inspect_widget): the worker thread must not be the
# first to load timm/torchvision/triton.
from mim_workbench.inference.predict import load_predictor
from mim_workbench.training.events import CheckpointSaved, Failed, Finished, Progress, Started

from ._background import BackgroundRun, RunControls
from ._multiscale import layer_pyramid, tiled_root, wants_tiled
from ._pretrain_widget import LossPlot, _fmt_eta, detected_devices
from ._status import status_label

TASK_CLASSIFY = "classifier (image labels)"
TASK_DENSE = "dense map (painted strokes)"
FROM_DATASET = "dataset folder / CSV"
FROM_LAYERS = "layer metadata"
STROKES_PREFIX = "strokes: "
#: Longest side of the level strokes are painted at on a multiscale image (dense heads need detail).
STROKES_MAX_SIDE = 4096
HEATMAP_PREFIX = "heatmap: "
DENSE_PREFIX = "dense: "
_OWN_PREFIXES = (HEATMAP_PREFIX, DENSE_PREFIX, "masked: ", "recon: ", "recon+visible: ", "error: ",
                 "masking preview: ")


def _blank(value: Any) -> bool:
    return str(value) in ("", ".")


def fresh_run_dir(path: str | Path) -> Path:
    """``path`` if it holds no run yet, else the first free ``path-2``, ``path-3``, …"""
    base = Path(path).expanduser()
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class FinetuneWidget(RunControls, Container):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from mim_workbench.sample import sample_root

        self.viewer = napari_viewer
        self.task = ComboBox(label="Train", choices=[TASK_CLASSIFY, TASK_DENSE], value=TASK_CLASSIFY)
        self.labels_from = ComboBox(label="Labels from", choices=[FROM_DATASET, FROM_LAYERS], value=FROM_DATASET)
        self.data = FileEdit(label="Dataset or CSV", mode="d", value=str(sample_root()))
        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.label_text = LineEdit(label="Its label", value="")
        self.set_label = PushButton(text="Set label of image")
        self.classes = LineEdit(label="Stroke classes", value="lesion, background")
        self.new_strokes = PushButton(text="New strokes layer")
        self.encoder = FileEdit(label="Encoder checkpoint", mode="d", value="")
        self.mode = ComboBox(label="Mode", choices=["probe", "full"], value="probe")
        self.epochs = SpinBox(label="Epochs", min=1, max=10000, value=30)
        self.steps = SpinBox(label="Dense steps", min=1, max=100000, value=300)
        self.out = FileEdit(label="Run folder", mode="d",
                            value=str(Path.home() / "mim-workbench-runs" / "finetune"))
        self.device = ComboBox(label="Device", choices=detected_devices(), value="auto")
        self.start = PushButton(text="Start")
        self.pause = PushButton(text="Pause")
        self.stop = PushButton(text="Stop")
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.status = status_label("ready")
        self.model = FileEdit(label="Model checkpoint", mode="d", value="")
        self.colormap = ComboBox(label="Heat-map colours", choices=["inferno", "magma", "viridis", "turbo"],
                                 value="inferno")
        self.opacity = FloatSlider(label="Heat-map opacity", min=0.0, max=1.0, step=0.05, value=0.5)
        self.predict_button = PushButton(text="Predict on image")
        self.result = status_label()
        self.result.native.setWordWrap(True)
        self.extend([self.task, self.labels_from, self.data, self.image, self.label_text, self.set_label,
                     self.classes, self.new_strokes, self.encoder, self.mode, self.epochs, self.steps, self.out,
                     self.device, self.start, self.pause, self.stop, self.progress, self.status])
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.canvas)
        predict_box = Container(widgets=[self.model, self.colormap, self.opacity, self.predict_button, self.result],
                                labels=True)
        self.native.layout().addWidget(predict_box.native)
        self._predict_box = predict_box

        self.task.changed.connect(self._update_visibility)
        self.labels_from.changed.connect(self._update_visibility)
        self.set_label.changed.connect(self.set_image_label)
        self.new_strokes.changed.connect(self.create_strokes_layer)
        self.start.changed.connect(self.start_training)
        self.pause.changed.connect(self.toggle_pause)
        self.stop.changed.connect(self.stop_training)
        self.predict_button.changed.connect(self.predict)
        self.opacity.changed.connect(self._style_heatmaps)
        self.colormap.changed.connect(self._style_heatmaps)
        self.image.changed.connect(self._show_image_label)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self.job = BackgroundRun(self.on_event, self._on_done)
        self.native.destroyed.connect(self.job.shutdown)
        self.predict_worker = None
        self.last_prediction = None
        self._predictors: dict[str, Any] = {}
        self._set_running(False)
        self._update_visibility()
        self._show_image_label()

    # ------------------------------------------------------------------ layers
    def _image_layers(self, _=None) -> list:
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and not l.name.startswith(_OWN_PREFIXES)]

    def _refresh(self, event=None) -> None:
        self.image.reset_choices()

    def strokes_layer(self, image) -> Any:
        name = STROKES_PREFIX + image.name
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def create_strokes_layer(self) -> None:
        from napari.utils.notifications import show_error

        img = self.image.value
        if img is None:
            show_error("Choose an image layer to paint strokes on.")
            return
        layer = self.strokes_layer(img)
        if layer is None:
            from ._multiscale import layer_level_for_max_side

            # multiscale: a reduced level (a 30000² Labels layer would not fit); staged with that level
            _level, shape, scale = layer_level_for_max_side(img, STROKES_MAX_SIDE)
            layer = self.viewer.add_labels(np.zeros(shape, dtype=np.uint8), name=STROKES_PREFIX + img.name,
                                           scale=scale, translate=img.translate[-2:], opacity=0.8)
        layer.brush_size = max(2, int(min(layer.data.shape) // 100))
        layer.selected_label = 1
        layer.mode = "paint"
        self.viewer.layers.selection.active = layer
        self.status.value = f"paint strokes: label k = class k of '{self.classes.value}'"

    def set_image_label(self) -> None:
        img = self.image.value
        if img is None:
            return
        text = str(self.label_text.value).strip()
        if text:
            img.metadata["label"] = text
        else:
            img.metadata.pop("label", None)
        self._show_image_label()

    def _show_image_label(self, *_: Any) -> None:
        counts: dict[str, int] = {}
        for layer in self._image_layers():
            lab = layer.metadata.get("label")
            if lab:
                counts[str(lab)] = counts.get(str(lab), 0) + 1
        img = self.image.value
        if img is not None and img.metadata.get("label") is not None:
            self.label_text.value = str(img.metadata["label"])
        if self.labels_from.value == FROM_LAYERS and self.task.value == TASK_CLASSIFY:
            summary = ", ".join(f"{k} ×{n}" for k, n in sorted(counts.items())) or "none yet"
            self.status.value = f"labelled layers: {summary}"

    def _update_visibility(self, *_: Any) -> None:
        dense = self.task.value == TASK_DENSE
        layers = self.labels_from.value == FROM_LAYERS
        self.labels_from.visible = not dense
        self.data.visible = not dense and not layers
        self.label_text.visible = self.set_label.visible = not dense and layers
        self.classes.visible = self.new_strokes.visible = dense
        self.mode.visible = self.epochs.visible = not dense
        self.steps.visible = dense

    # ------------------------------------------------------------------ settings → job
    def _staged(self, layers: list) -> list:
        from mim_workbench.io.staging import StagedImage

        items = []
        for layer in layers:
            strokes = self.strokes_layer(layer)
            data = layer.data[0] if layer.multiscale else layer.data
            if layer.multiscale and strokes is not None:  # the level the strokes were painted on
                data = next((d for d in layer.data if tuple(d.shape[:2]) == tuple(strokes.data.shape[:2])), data)
            source = layer.metadata.get("source") or (str(layer.source.path) if layer.source.path else None)
            items.append(StagedImage(name=layer.name, data=np.asarray(data), source=source,
                                     label=layer.metadata.get("label"),
                                     strokes=None if strokes is None else np.asarray(strokes.data)))
        return items

    def job_spec(self) -> tuple[str, dict[str, Any], Path]:
        """(task, config dict, run folder) for the current settings; stages viewer-only inputs."""
        from mim_workbench.errors import ConfigError
        from mim_workbench.io.staging import stage_labelled, stage_strokes
        from mim_workbench.training.finetune import FinetuneConfig
        from mim_workbench.training.tasks import DenseJob

        out = fresh_run_dir(str(self.out.value))
        encoder = None if _blank(self.encoder.value) else str(self.encoder.value)
        device = self.device.value
        if self.task.value == TASK_DENSE:
            classes = [c.strip() for c in str(self.classes.value).split(",") if c.strip()]
            if len(classes) < 2:
                raise ConfigError(f"stroke classes {self.classes.value!r}: name at least two, separated by commas")
            images, strokes = stage_strokes(self._staged(self._image_layers()), out / "inputs")
            job = DenseJob(images=images, strokes=strokes, out=str(out), checkpoint=encoder,
                           config={"classes": classes, "steps": int(self.steps.value), "device": device})
            return "dense", job.to_dict(), out
        if self.labels_from.value == FROM_LAYERS:
            data = str(stage_labelled(self._staged(self._image_layers()), out / "inputs"))
        else:
            if _blank(self.data.value):
                raise ConfigError("choose a dataset folder or a CSV manifest with labels")
            data = str(self.data.value)
        cfg = FinetuneConfig(data=data, out=str(out), checkpoint=encoder, mode=self.mode.value,
                             epochs=int(self.epochs.value), device=device)
        return "finetune", cfg.to_dict(), out

    # ------------------------------------------------------------------ control
    def _set_running(self, running: bool) -> None:
        self.start.enabled = not running
        self.pause.enabled = self.stop.enabled = running
        for w in (self.task, self.labels_from, self.data, self.encoder, self.mode, self.epochs, self.steps,
                  self.out, self.device, self.classes):
            w.enabled = not running

    def start_training(self) -> None:
        from napari.utils.notifications import show_error

        from mim_workbench.errors import MimError

        try:
            task, config, out = self.job_spec()
        except MimError as exc:
            show_error(f"Fine-tuning not started: {exc}")
            self.status.value = "not started; ready"
            return
        self.out.value = str(out)
        self._launch(task, config)

    def _on_done(self) -> None:
        self._set_running(False)

    def on_event(self, event: Any) -> None:
        from napari.utils.notifications import show_error, show_info

        if isinstance(event, Started):
            self.progress.max = max(1, event.stop_at or event.total_steps)
            self.progress.value = 0
            self.status.value = f"training on {event.device} ({event.n_train} images)"
        elif isinstance(event, Progress):
            self.plot.add(event.step, event.loss, event.val_loss)
            self._progress_later(event)
        elif isinstance(event, CheckpointSaved):
            self.model.value = event.path
        elif isinstance(event, Finished):
            self._flush_progress()
            self.progress.value = self.progress.max
            self.status.value = f"finished ({event.reason}) at step {event.step}"
            if event.last_checkpoint:
                self.model.value = event.last_checkpoint
                show_info(f"Fine-tuning {event.reason}; model: {event.last_checkpoint}")
        elif isinstance(event, Failed):
            self._pending_progress = None  # the failure is the news now
            self.status.value = "failed; ready"
            show_error(f"Fine-tuning failed: {event.message}")

    def _render_progress(self, event: Progress) -> None:
        self.progress.value = min(event.step, self.progress.max)
        self.status.value = f"step {event.step}/{event.total}  loss {event.loss:.4f}  ETA {_fmt_eta(event.eta_s)}"

    # ------------------------------------------------------------------ predict
    def text_overlay(self):
        # napari >= 0.9 moved the overlays to viewer.canvas.overlays
        canvas = getattr(self.viewer, "canvas", None)
        overlays = getattr(canvas, "overlays", None)
        return overlays.text if overlays is not None and hasattr(overlays, "text") else self.viewer.text_overlay

    def _announce(self, img, label: str, prob: float) -> None:
        """The predicted class on the canvas, top left, where the eye is."""
        overlay = self.text_overlay()
        overlay.text = f"{img.name}: {label} ({prob:.2f})"
        overlay.position = "top_left"
        overlay.font_size = 14
        overlay.visible = True

    def _predictor(self, path: str):
        if path not in self._predictors:
            self._predictors = {path: load_predictor(path)}  # one model at a time: memory is finite
        return self._predictors[path]

    def predict(self) -> None:
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        img = self.image.value
        path = str(self.model.value)
        if img is None or _blank(path):
            show_error("Choose a fine-tuned model checkpoint and an image layer to predict on.")
            return
        if wants_tiled(img):
            self._predict_tiled(img, path)
            return
        data = np.asarray(img.data)

        def work():
            return self._predictor(path)(data)

        self.result.value = "predicting…"
        self.predict_button.enabled = False
        self.predict_worker = create_worker(work, _ignore_errors=True)  # errors reach _predict_failed
        self.predict_worker.returned.connect(lambda pred: self._show_prediction(pred, img))
        self.predict_worker.errored.connect(self._predict_failed)
        self.predict_worker.finished.connect(self._predict_done)
        self.predict_worker.start()

    def _predict_tiled(self, img, path: str) -> None:
        """A large image: tile by tile into zarr maps shown as a multiscale heat map that fills in."""
        import uuid

        from napari.qt.threading import create_worker

        from mim_workbench.inference.tiled_predict import iter_predict_tiled

        pyr = layer_pyramid(img)
        out = tiled_root("predict") / f"{uuid.uuid4().hex}.zarr"

        def work():
            stats: dict[str, Any] = {}
            for band in iter_predict_tiled(self._predictor(path), pyr, out=out, level=0, stats=stats):
                yield band, stats["output"]
            return stats

        self.result.value = "predicting tile by tile…"
        self.predict_button.enabled = False
        self.band_updates = []
        self.predict_worker = create_worker(work, _ignore_errors=True)  # errors reach _predict_failed
        self.predict_worker.yielded.connect(lambda item: self._show_band(item, img))
        self.predict_worker.returned.connect(lambda stats: self._show_tiled_prediction(stats, img))
        self.predict_worker.errored.connect(self._predict_failed)
        self.predict_worker.finished.connect(self._predict_done)
        self.predict_worker.start()

    def _show_band(self, item, img) -> None:
        import shutil

        band, output = item
        name = HEATMAP_PREFIX + img.name
        key = output.names[0]   # the classifier's map, or a dense head's first class
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is None or layer.metadata.get("mim_workbench_tiled") != str(output.path):
            old = layer.metadata.get("mim_workbench_tiled") if layer is not None else None
            for stale in (name, DENSE_PREFIX + img.name):
                if stale in self.viewer.layers:
                    self.viewer.layers.remove(stale)
            # zarr arrays, not dask: every refresh reads what is on disk now
            layer = self.viewer.add_image(
                output.levels(key), name=name, multiscale=True, scale=tuple(output.scale),
                translate=img.translate[-2:], colormap=self.colormap.value, opacity=float(self.opacity.value),
                blending="additive", contrast_limits=(0.0, 1.0), metadata={"mim_workbench_tiled": str(output.path)})
            if old:
                shutil.rmtree(old, ignore_errors=True)  # nothing shows it any more
        if key == "map":  # raw patch logits: scale the colours to what is there so far
            coarse = np.asarray(output.levels(key)[-1][...])
            lo, hi = float(coarse.min()), float(coarse.max())
            layer.contrast_limits = (lo, hi if hi > lo else lo + 1e-6)
        layer.refresh()
        self.band_updates.append((band.row0, band.row1, band.tiles_done, band.tiles_total))
        self.result.value = f"tiled: {band.tiles_done}/{band.tiles_total} tiles, rows up to {band.row1}"

    def _show_tiled_prediction(self, stats: dict, img) -> None:
        record = stats.get("record") or {}
        self.last_prediction = record
        layer = self.viewer.layers[HEATMAP_PREFIX + img.name]
        layer.metadata.update({k: record[k] for k in ("probs", "label", "map_class", "classes") if k in record})
        if record.get("kind") == "classifier":
            ranked = sorted(record["probs"].items(), key=lambda kv: -kv[1])
            self.result.value = (f"{img.name}: " + " · ".join(f"{c} {p:.2f}" for c, p in ranked)
                                 + f"; map: patch logit of {record['map_class']}, {stats.get('tiles', 0)} tiles")
            self._announce(img, record["label"], record["probs"][record["label"]])
        else:
            shares = ", ".join(f"{c} {f:.1%}" for c, f in record.get("label_fraction", {}).items())
            self.result.value = (f"{img.name}: {shares}; heat map: p({record['classes'][0]}), "
                                 f"{stats.get('tiles', 0)} tiles")

    def _predict_failed(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        self.result.value = "prediction failed"
        show_error(f"Prediction failed: {exc}")

    def _predict_done(self) -> None:
        self.predict_button.enabled = True
        self.predict_worker = None

    def _put_layer(self, kind: str, name: str, data: np.ndarray, img, **kwargs: Any):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            return layer
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, scale=img.scale[-2:], translate=img.translate[-2:], **kwargs)

    def _style_heatmaps(self, *_: Any) -> None:
        for layer in self.viewer.layers:
            if layer.name.startswith(HEATMAP_PREFIX):
                layer.opacity = float(self.opacity.value)
                layer.colormap = self.colormap.value

    def _show_prediction(self, pred: Any, img) -> None:
        self.last_prediction = pred
        heat_kwargs = {"colormap": self.colormap.value, "opacity": float(self.opacity.value),
                       "blending": "additive", "contrast_limits": (0.0, 1.0)}
        if hasattr(pred, "probs") and np.ndim(pred.probs) == 1:
            probs = {c: float(p) for c, p in zip(pred.classes, pred.probs)}
            lo, hi = float(pred.map.min()), float(pred.map.max())
            heat = ((pred.map - lo) / (hi - lo) if hi > lo else np.zeros_like(pred.map)).astype(np.float32)
            layer = self._put_layer("image", HEATMAP_PREFIX + img.name, heat, img, **heat_kwargs)
            layer.metadata.update({"probs": probs, "label": pred.label, "map_kind": pred.map_kind})
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])
            text = " · ".join(f"{c} {p:.2f}" for c, p in ranked)
            self.result.value = f"{img.name}: {text}"
            self._announce(img, pred.label, probs[pred.label])
            return
        # dense prediction: per-pixel classes and probabilities
        labels = self._put_layer("labels", DENSE_PREFIX + img.name, pred.labels, img, opacity=0.5)
        labels.metadata["classes"] = list(pred.classes)
        heat = pred.probs[0].astype(np.float32)
        layer = self._put_layer("image", HEATMAP_PREFIX + img.name, heat, img, **heat_kwargs)
        layer.metadata.update({"class": pred.classes[0]})
        shares = [f"{k + 1}={c} {float((pred.labels == k + 1).mean()):.1%}" for k, c in enumerate(pred.classes)]
        self.result.value = f"{img.name}: " + ", ".join(shares) + f"; heat map: p({pred.classes[0]})"
