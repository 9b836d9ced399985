"""The Fine-tune dock's predict panel: a fine-tuned model's prediction on an image, overlaid.

A classifier gives class probabilities (panel text and the viewer's text overlay) and a
heat map ``heatmap: NAME``; a dense head gives a Labels layer ``dense: NAME`` and the heat
map of its first class.  Large images (multiscale, or above the tiling threshold) are
predicted tile by tile into zarr maps: the heat map (and a dense head's labels, computed
from the class maps on read) are multiscale layers that fill in while it runs.
Prediction runs in a napari worker thread; the layers change on the GUI thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSlider, PushButton

# Imported on the main thread (see _inspect_widget): the worker thread must not be the
# first to load timm/torchvision/triton.
from mim_workbench.inference.predict import load_predictor

from ._multiscale import ScratchMaps, layer_pyramid, wants_tiled
from ._status import job_handlers, path_edit, status_label

if TYPE_CHECKING:
    from pathlib import Path

    from napari.components.overlays import TextOverlay

    from mim_workbench.inference.predict import Prediction
    from mim_workbench.models.dense import DensePrediction

HEATMAP_PREFIX = "heatmap: "
DENSE_PREFIX = "dense: "


def blank(value: Path | str) -> bool:
    """An empty path field (magicgui shows an empty FileEdit as '.')."""
    return str(value) in ("", ".")


class PredictPanel:
    """Predict on the chosen image layer and overlay the result.

    Mixed into a dock that has ``viewer`` and ``image`` (a choice of image layers);
    :meth:`_build_predict_panel` makes the panel's widgets and returns them in a container.
    """

    def _build_predict_panel(self) -> Container:
        self.model = path_edit(label="Model checkpoint", mode="d", value="",
                               placeholder="a fine-tuned model (filled in when fine-tuning ends)")
        self.colormap = ComboBox(label="Heat-map colours", choices=["inferno", "magma", "viridis", "turbo"],
                                 value="inferno")
        self.opacity = FloatSlider(label="Heat-map opacity", min=0.0, max=1.0, step=0.05, value=0.5)
        self.predict_button = PushButton(text="Predict on image")
        self.result = status_label("Predictions appear here: choose a fine-tuned model and an image, "
                                   "then Predict on image.")
        self._predict_failed, self._predict_done = job_handlers(
            self, label=self.result, button=self.predict_button, worker_attr="predict_worker", action="Prediction")
        self.predict_button.changed.connect(self.predict)
        self.opacity.changed.connect(self._style_heatmaps)
        self.colormap.changed.connect(self._style_heatmaps)
        self.predict_worker = None
        self.last_prediction = None
        self._predictors: dict[str, Any] = {}
        self.maps = ScratchMaps("predict")            # the zarr maps tiled heat maps read
        self.native.destroyed.connect(self.maps.clear)
        return Container(widgets=[self.model, self.colormap, self.opacity, self.predict_button, self.result],
                         labels=True)

    def text_overlay(self) -> TextOverlay:
        """The viewer's text overlay (``viewer.canvas.overlays.text`` from napari 0.9, else ``viewer.text_overlay``)."""
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
        """Predict on the chosen image with the chosen checkpoint in a thread worker and overlay the result; large
        images go tile by tile. No model or image, or a failure: an error notification."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        img = self.image.value
        path = str(self.model.value)
        if img is None or blank(path):
            show_error("Choose a fine-tuned model checkpoint and an image layer to predict on.")
            return
        if wants_tiled(img):
            self._predict_tiled(img, path)
            return
        data = np.asarray(img.data)

        def work():
            """In the worker thread: the prediction of ``data`` (a checkpoint's model is loaded once)."""
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
        from mim_workbench.inference.tiled_predict import iter_predict_tiled

        pyr = layer_pyramid(img)
        out = self.maps.new()

        def work():
            """In the worker thread: yields ``(band, output)`` while the maps fill; returns the writer's stats,
            None when the maps were cleared meanwhile."""
            predictor = self._predictor(path)
            return (yield from self.maps.stream(
                out, lambda stats: iter_predict_tiled(predictor, pyr, out=out, level=0, stats=stats)))

        self.result.value = "predicting tile by tile…"
        self.predict_button.enabled = False
        self.band_updates = []
        self.predict_worker = self.maps.start(
            work, on_band=lambda item: self._show_band(item, img),
            on_done=lambda stats: self._show_tiled_prediction(stats, img),
            on_error=self._predict_failed, on_finished=self._predict_done)

    def _show_band(self, item, img) -> None:
        band, output = item
        name = HEATMAP_PREFIX + img.name
        key = output.names[0]   # the classifier's map, or a dense head's first class
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is None or self.maps.shown.get(img.name) != output.path:
            for stale in (name, DENSE_PREFIX + img.name):
                if stale in self.viewer.layers:
                    self.viewer.layers.remove(stale)
            # zarr arrays, not dask: every refresh reads what is on disk now
            layer = self.viewer.add_image(
                output.levels(key), name=name, multiscale=True, scale=tuple(output.scale),
                translate=img.translate[-2:], colormap=self.colormap.value, opacity=float(self.opacity.value),
                blending="additive", contrast_limits=(0.0, 1.0), metadata={"mim_workbench_tiled": str(output.path)})
            if key != "map":  # a dense head: its labels (1 + argmax of the class maps), read as they fill in
                from mim_workbench.inference.tiling import argmax_labels

                self.viewer.add_labels(argmax_labels(output, output.names), name=DENSE_PREFIX + img.name,
                                       multiscale=True, scale=tuple(output.scale), translate=img.translate[-2:],
                                       opacity=0.5, metadata={"mim_workbench_tiled": str(output.path)})
            self.maps.show(img.name, output.path)
        if key == "map":  # raw patch logits: scale the colours to what is there so far
            coarse = np.asarray(output.levels(key)[-1][...])
            lo, hi = float(coarse.min()), float(coarse.max())
            layer.contrast_limits = (lo, hi if hi > lo else lo + 1e-6)
        layer.refresh()
        if DENSE_PREFIX + img.name in self.viewer.layers and key != "map":
            self.viewer.layers[DENSE_PREFIX + img.name].refresh()
        self.band_updates.append((band.row0, band.row1, band.tiles_done, band.tiles_total))
        self.result.value = f"tiled: {band.tiles_done}/{band.tiles_total} tiles, rows up to {band.row1}"

    def _show_tiled_prediction(self, stats: dict | None, img) -> None:
        if stats is None:    # cut short: the dock or the viewer is closing
            return
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
            if DENSE_PREFIX + img.name in self.viewer.layers:
                self.viewer.layers[DENSE_PREFIX + img.name].metadata["classes"] = list(record.get("classes", []))
            shares = ", ".join(f"{c} {f:.1%}" for c, f in record.get("label_fraction", {}).items())
            self.result.value = (f"{img.name}: {shares}; heat map: p({record['classes'][0]}), "
                                 f"{stats.get('tiles', 0)} tiles")

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

    def _show_prediction(self, pred: Prediction | DensePrediction, img) -> None:
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
