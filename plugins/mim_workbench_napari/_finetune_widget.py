"""Fine-tune & predict dock: few labels in, predictions overlaid on the images.

Labels come from a dataset folder or CSV manifest, from image layers' metadata
(``layer.metadata["label"]``, set here with "Set label"), or from strokes painted
on a ``strokes: NAME`` Labels layer (dense head).  Training runs in a child process
like pretraining (:mod:`._background`); inputs that only exist in the viewer are
staged into the run folder first (:mod:`mim_workbench.io.staging`), so painted
strokes are on disk before training starts.

Predictions and their overlays are the dock's lower panel (:mod:`._predict_panel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import napari  # the viewer annotation must resolve: napari injects it by type
import numpy as np
from magicgui.widgets import ComboBox, Container, LineEdit, ProgressBar, PushButton, SpinBox

from mim_workbench.training.events import CheckpointSaved, Failed, Finished, Progress, Started

from ._background import BackgroundRun, RunControls
from ._predict_panel import DENSE_PREFIX, HEATMAP_PREFIX, PredictPanel, blank
from ._self_check import arm_from_env
from ._status import checkpoint_phrase, path_edit, status_label
from ._training_widgets import LossPlot, detected_devices, fmt_eta

if TYPE_CHECKING:
    from mim_workbench.training.events import Event

TASK_CLASSIFY = "classifier (image labels)"
TASK_DENSE = "dense map (painted strokes)"
FROM_DATASET = "dataset folder / CSV"
FROM_LAYERS = "layer metadata"
STROKES_PREFIX = "strokes: "
#: Longest side of the level strokes are painted at on a multiscale image (dense heads need detail).
STROKES_MAX_SIDE = 4096
_OWN_PREFIXES = (HEATMAP_PREFIX, DENSE_PREFIX, "masked: ", "recon: ", "recon+visible: ", "error: ",
                 "masking preview: ")


def fresh_run_dir(path: str | Path) -> Path:
    """``path`` if it holds no run yet, else the first free ``path-2``, ``path-3``, …"""
    base = Path(path).expanduser()
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class FinetuneWidget(RunControls, PredictPanel, Container):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from mim_workbench.sample import sample_root

        self.viewer = napari_viewer
        arm_from_env(napari_viewer)
        self.task = ComboBox(label="Train", choices=[TASK_CLASSIFY, TASK_DENSE], value=TASK_CLASSIFY)
        self.labels_from = ComboBox(label="Labels from", choices=[FROM_DATASET, FROM_LAYERS], value=FROM_DATASET)
        self.data = path_edit(label="Dataset or CSV", mode="d", value=str(sample_root()))
        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.label_text = LineEdit(label="Its label", value="")
        self.set_label = PushButton(text="Set label of image")
        self.classes = LineEdit(label="Stroke classes", value="lesion, background")
        self.new_strokes = PushButton(text="New strokes layer")
        self.encoder = path_edit(label="Encoder checkpoint", mode="d", value="",
                                 placeholder="a pretraining run or checkpoint folder")
        self.mode = ComboBox(label="Mode", choices=["probe", "full"], value="probe")
        self.epochs = SpinBox(label="Epochs", min=1, max=10000, value=30)
        self.steps = SpinBox(label="Dense steps", min=1, max=100000, value=300)
        self.out = path_edit(label="Run folder", mode="d",
                            value=str(Path.home() / "mim-workbench-runs" / "finetune"))
        self.device = ComboBox(label="Device", choices=detected_devices(), value="auto")
        self.start = PushButton(text="Start")
        self.resume_run = PushButton(text="Resume stopped run",
                                     tooltip="continue the run in Run folder from its last finished epoch")
        self.pause = PushButton(text="Pause")
        self.stop = PushButton(text="Stop")
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.status = status_label("ready: choose where the labels come from, an encoder checkpoint "
                                   "(Pretrain's run folder) and a run folder, then Start")
        self.extend([self.task, self.labels_from, self.data, self.image, self.label_text, self.set_label,
                     self.classes, self.new_strokes, self.encoder, self.mode, self.epochs, self.steps, self.out,
                     self.device, self.start, self.resume_run, self.pause, self.stop, self.progress, self.status])
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.canvas)
        self._predict_box = self._build_predict_panel()
        self.native.layout().addWidget(self._predict_box.native)

        self.task.changed.connect(self._update_visibility)
        self.labels_from.changed.connect(self._update_visibility)
        self.set_label.changed.connect(self.set_image_label)
        self.new_strokes.changed.connect(self.create_strokes_layer)
        self.start.changed.connect(self.start_training)
        self.resume_run.changed.connect(self.resume_training)
        self.out.changed.connect(self._update_resumable)
        self.pause.changed.connect(self.toggle_pause)
        self.stop.changed.connect(self.stop_training)
        self.image.changed.connect(self._show_image_label)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self.job = BackgroundRun(self.on_event, self._on_done)
        self.native.destroyed.connect(self.job.shutdown)
        self._set_running(False)
        self._update_visibility()
        self._show_image_label()

    # ------------------------------------------------------------------ layers
    def _image_layers(self, _=None) -> list:
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and not l.name.startswith(_OWN_PREFIXES)]

    def _refresh(self, event=None) -> None:
        self.image.reset_choices()

    def strokes_layer(self, image: napari.layers.Image) -> napari.layers.Labels | None:
        """The ``strokes: NAME`` Labels layer of ``image``, or None."""
        name = STROKES_PREFIX + image.name
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def create_strokes_layer(self) -> None:
        """Select the chosen image's strokes layer (added empty when missing; on a multiscale image at the level
        whose longest side is <= :data:`STROKES_MAX_SIDE`) in paint mode, label 1. No image: a notification."""
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
        """Store *Its label* as the chosen image's ``metadata["label"]`` (empty text removes it); updates the
        status's label counts."""
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
        self._update_resumable()

    def _update_resumable(self, *_: Any) -> None:
        """"Resume stopped run" shows while Run folder holds a classifier run that can continue."""
        from mim_workbench.training.finetune_state import resumable

        self.resume_run.visible = self.task.value == TASK_CLASSIFY and not blank(self.out.value) \
            and resumable(Path(str(self.out.value)).expanduser())

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
        encoder = None if blank(self.encoder.value) else str(self.encoder.value)
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
            if blank(self.data.value):
                raise ConfigError("choose a dataset folder or a CSV manifest with labels")
            data = str(self.data.value)
        cfg = FinetuneConfig(data=data, out=str(out), checkpoint=encoder, mode=self.mode.value,
                             epochs=int(self.epochs.value), device=device)
        return "finetune", cfg.to_dict(), out

    # ------------------------------------------------------------------ control
    def _settings(self) -> tuple:
        return (self.resume_run, self.task, self.labels_from, self.data, self.encoder, self.mode, self.epochs,
                self.steps, self.out, self.device, self.classes)

    def start_training(self) -> None:
        """Start fine-tuning with the current settings in a fresh run folder (shown in Run folder), viewer-only
        inputs staged first; a MimError (e.g. ConfigError) becomes a notification and nothing starts."""
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

    def resume_training(self) -> None:
        """Continue the run in Run folder with its own settings (the Device choice applies)."""
        from napari.utils.notifications import show_error

        from mim_workbench.errors import MimError
        from mim_workbench.training.finetune import FinetuneConfig
        from mim_workbench.training.finetune_state import resume_config

        try:
            values = resume_config(Path(str(self.out.value)).expanduser(), device=self.device.value)
            config = FinetuneConfig.from_dict(values).to_dict()
        except MimError as exc:
            show_error(f"Fine-tuning not resumed: {exc}")
            self.status.value = "not resumed; ready"
            return
        self._launch("finetune", config)

    def _on_done(self) -> None:
        self._set_running(False)
        self._update_resumable()

    def on_event(self, event: Event) -> None:
        """Show one training event: progress and the loss curve, each checkpoint as Model checkpoint, the end
        or a failure as a notification."""
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
            self.status.value = f"finished ({event.reason}) at step {event.step}" + (
                "; Resume stopped run continues it" if event.reason in ("stopped", "time_budget", "max_steps")
                else "")
            if event.last_checkpoint:
                self.model.value = event.last_checkpoint
                show_info(f"Fine-tuning {event.reason} at step {event.step}; "
                          f"model {checkpoint_phrase(event.last_checkpoint)}")
        elif isinstance(event, Failed):
            self._pending_progress = None  # the failure is the news now
            self.status.value = "failed; ready"
            show_error(f"Fine-tuning failed: {event.message}")

    def _render_progress(self, event: Progress) -> None:
        self.progress.value = min(event.step, self.progress.max)
        self.status.value = f"step {event.step}/{event.total}  loss {event.loss:.4f}  ETA {fmt_eta(event.eta_s)}"
