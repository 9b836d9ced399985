"""Pretrain dock: settings, Start / Pause / Stop / Resume, progress, live loss, previews.

Training runs in a child process (:class:`mim_workbench.training.runner.TrainingProcess`)
supervised by a napari ``thread_worker`` that only forwards events; this widget turns
them into a progress bar, a loss curve and preview layers updated in place by name.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from magicgui.widgets import (ComboBox, Container, FloatSpinBox, ProgressBar, PushButton,
                              SpinBox)

from mim_workbench.models.config import METHODS
from mim_workbench.training.events import (CheckpointSaved, Event, Failed, Finished, Preparing, Preview, Progress,
                                          Started)

from ._background import BackgroundRun, RunControls
from ._layers import show_side_by_side
from ._self_check import arm_from_env
from ._status import checkpoint_phrase, path_edit, status_label
from ._training_widgets import LossPlot, detected_devices, fmt_eta

import napari  # the viewer annotation must resolve: napari injects it by type

MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
# "custom": the fields as shown; a preset also sets what has no field (patch size, widths, lr, time budget)
PRESET_CHOICES = ["cpu", "custom", "quick-cpu", "rgmim-paper"]
#: where region masking's masks come from: the data set's mask files, or a region preset
REGION_SOURCES = ["dataset's masks", "propose: lungs", "propose: breast", "propose: teeth", "propose: tissue"]


class PretrainWidget(RunControls, Container):
    #: Previews reach the viewer at most this often, the newest one winning: each costs the event
    #: loop 40-55 ms of canvas redraw on software GL, and a faster run (bf16, a GPU) sends them
    #: more often.  At 25 steps a preview, 2x faster training gave 6 previews in 30 s and 3 gaps
    #: over 50 ms (bench_gui_latency.py, Xvfb + llvmpipe); one every 5 s keeps them apart.
    preview_interval_s = 5.0
    _pending_preview: Preview | None = None
    _preview_timer = None
    _preview_shown_at = -math.inf

    stop_message = "stopping: saving a checkpoint…"

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from mim_workbench.sample import sample_root

        self.viewer = napari_viewer
        arm_from_env(napari_viewer)
        self.data = path_edit(label="Dataset folder", mode="d", value=str(sample_root()))
        self.out = path_edit(label="Run folder", mode="d", value=str(Path.home() / "mim-workbench-runs" / "run"))
        self.preset = ComboBox(label="Preset", choices=PRESET_CHOICES, value="cpu")
        self.method = ComboBox(label="Method", choices=list(METHODS), value="mae",
                               tooltip="pixels: mae, simmim, miram (multi-scale); visual tokens: beit; "
                                       "teacher features: feature (data2vec)")
        self.strategy = ComboBox(label="Masking", choices=["region", "random", "block", "blockwise"], value="region")
        self.regions = ComboBox(label="Regions from", choices=REGION_SOURCES, value=REGION_SOURCES[0],
                                tooltip="region masking needs masks: the dataset's own, or proposed with a preset "
                                        "for the images that have none (once; cached)")
        self.model = ComboBox(label="Model", choices=MODELS, value=MODELS[0])
        self.img_size = SpinBox(label="Image size", min=32, max=1024, step=16, value=224)
        self.ratio = FloatSpinBox(label="Mask ratio", min=0.05, max=0.95, step=0.05, value=0.75)
        self.epochs = SpinBox(label="Epochs", min=1, max=10000, value=20)
        self.batch = SpinBox(label="Batch", min=1, max=4096, value=16)
        self.blr = FloatSpinBox(label="Base lr", min=1e-6, max=1.0, step=1e-5, value=4e-4)
        devices = detected_devices()
        self.device = ComboBox(label="Device", choices=devices, value="auto")
        self.resume_from = path_edit(label="Resume from", mode="r", value="",
                                     placeholder="empty: a new run (a stopped run fills this in)")
        self.start = PushButton(text="Start")
        self.pause = PushButton(text="Pause")
        self.stop = PushButton(text="Stop")
        self.progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self.status = status_label(f"ready (devices: {', '.join(d for d in devices if d != 'auto')}): choose "
                                   "a dataset folder and a run folder (the sample X-rays are set), a preset, then Start")
        self.checkpoints = ComboBox(label="Checkpoints", choices=[])
        self.extend([self.data, self.out, self.preset, self.method, self.strategy, self.regions, self.model, self.img_size, self.ratio,
                     self.epochs, self.batch, self.blr, self.device, self.resume_from, self.start, self.pause,
                     self.stop, self.progress, self.status, self.checkpoints])
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.canvas)

        self.preset.changed.connect(self.apply_preset)
        self.method.changed.connect(self.show_method_defaults)
        self.strategy.changed.connect(self._show_region_source)
        self.start.changed.connect(self.start_training)
        self.pause.changed.connect(self.toggle_pause)
        self.stop.changed.connect(self.stop_training)
        self.job = BackgroundRun(self.on_event, self._on_worker_done)
        self._preview_name = "preview"
        self._set_running(False)
        self.native.destroyed.connect(self.job.shutdown)
        self.apply_preset()   # the fields show the default preset's values
        self._show_region_source(self.strategy.value)

    # ------------------------------------------------------------------ settings → config
    def apply_preset(self, *_) -> None:
        """Show a preset's values in the fields it sets; settings without a field come from it too."""
        from mim_workbench.training.config import PRESETS, method_defaults

        values = PRESETS.get(self.preset.value, {})
        if "method" in values:   # what the preset leaves to its method: the method's own
            defaults = method_defaults(values["method"])
            values = {**{k: defaults[k] for k in ("strategy", "ratio", "blr")}, **values}
        encoder = values.get("encoder", {})
        fields = {"method": self.method, "strategy": self.strategy, "ratio": self.ratio,
                  "epochs": self.epochs, "batch_size": self.batch, "blr": self.blr}
        for key, widget in fields.items():
            if key in values:
                widget.value = values[key]
        if "model" in encoder:
            self.model.value = encoder["model"]
        if "img_size" in encoder:
            self.img_size.value = int(encoder["img_size"][0])

    def _show_region_source(self, strategy: str) -> None:
        """*Regions from* only matters to region masking: hidden for the other strategies."""
        self.regions.visible = strategy == "region"

    def show_method_defaults(self, method: str) -> None:
        """Set the mask ratio and base learning rate to the chosen method's own (MAE masks 75 %,
        SimMIM 60 %, BEiT 40 % and learns at a higher rate)."""
        from mim_workbench.training.config import method_defaults

        defaults = method_defaults(method)
        self.ratio.value, self.blr.value = defaults["ratio"], defaults["blr"]

    def config_dict(self) -> dict:
        """The dock's settings as a checked PretrainConfig dict; ConfigError names a bad one."""
        from mim_workbench.training import PretrainConfig

        resume = str(self.resume_from.value) if str(self.resume_from.value) not in ("", ".") else None
        values = dict(
            data=str(self.data.value), out=str(self.out.value), method=self.method.value,
            strategy=self.strategy.value, model=self.model.value,
            img_size=(int(self.img_size.value), int(self.img_size.value)), ratio=float(self.ratio.value),
            epochs=int(self.epochs.value), batch_size=int(self.batch.value), blr=float(self.blr.value),
            device=self.device.value, resume=resume,
        )
        if self.strategy.value == "region" and self.regions.value != REGION_SOURCES[0]:
            values["region_preset"] = self.regions.value.removeprefix("propose: ")
        if self.preset.value != "custom":
            values["preset"] = self.preset.value
        return PretrainConfig.from_dict(values).to_dict()

    # ------------------------------------------------------------------ control
    def _settings(self) -> tuple:
        return (self.data, self.out, self.preset, self.method, self.strategy, self.regions, self.model,
                self.img_size, self.ratio, self.epochs, self.batch, self.blr, self.device, self.resume_from)

    def start_training(self) -> None:
        """Start pretraining in a child process with the dock's settings; errors are shown, not raised."""
        from napari.utils.notifications import show_error

        from mim_workbench.errors import MimError

        try:
            config = self.config_dict()
        except MimError as exc:
            show_error(str(exc))
            return
        self._preview_name = Path(str(self.data.value)).name or "preview"
        self._launch("pretrain", config)

    def shutdown(self, *_) -> None:
        """Viewer closing: ask the run to checkpoint and stop, wait briefly, then end it."""
        self.job.shutdown()

    def _on_worker_done(self) -> None:
        self._set_running(False)

    # ------------------------------------------------------------------ events → widgets and layers
    def on_event(self, event: Event) -> None:
        """Show a training event: progress and loss curve, previews, checkpoints, the end."""
        from napari.utils.notifications import show_error, show_info, show_warning

        if isinstance(event, Preparing):
            self.progress.max = max(1, event.total)
            self.progress.value = event.done
            left = f", ETA {fmt_eta(event.eta_s)}" if event.eta_s is not None else ""
            self.status.value = f"{event.stage}: {event.done}/{event.total}{left}"
        elif isinstance(event, Started):
            self.progress.max = max(1, event.stop_at or event.total_steps)
            self.progress.value = event.start_step
            self.status.value = f"training on {event.device} ({event.n_train} images)"
        elif isinstance(event, Progress):
            self.plot.add(event.step, event.loss, event.val_loss)
            self._progress_later(event)
            for problem in event.unreadable:
                show_warning(f"Skipped an image that could not be read (training goes on): {problem}")
        elif isinstance(event, Preview):
            self._preview_later(event)
        elif isinstance(event, CheckpointSaved):
            choices = [*self.checkpoints.choices, event.path]
            self.checkpoints.choices = choices
            self.checkpoints.value = event.path
        elif isinstance(event, Finished):
            self._flush_progress()
            self._flush_preview()   # the run's last picture
            self.status.value = f"finished ({event.reason}) at step {event.step}"
            if event.last_checkpoint:
                self.resume_from.value = event.last_checkpoint
                self.status.value += f"; checkpoint {event.last_checkpoint}"
                show_info(f"Pretraining {event.reason} at step {event.step}; "
                          f"checkpoint {checkpoint_phrase(event.last_checkpoint)}")
        elif isinstance(event, Failed):
            self._pending_progress = None  # the failure is the news now
            self.status.value = "failed; ready"
            hint = f" Last checkpoint: {checkpoint_phrase(event.last_checkpoint)}" if event.last_checkpoint else ""
            show_error(f"Pretraining failed: {event.message}.{hint}")

    def _render_progress(self, event: Progress) -> None:
        self.progress.value = min(event.step, self.progress.max)
        extra = "".join(f"{name} {value:.3f}  " for name, value in event.metrics.items())
        self.status.value = (f"step {event.step}/{event.total}  loss {event.loss:.4f}  {extra}"
                             f"{event.images_per_s:.1f} img/s  ETA {fmt_eta(event.eta_s)}")

    def _preview_later(self, event: Preview) -> None:
        """Show ``event`` (the newest preview) now, or when ``preview_interval_s`` has passed."""
        self._pending_preview = event
        wait = self._preview_shown_at + self.preview_interval_s - time.monotonic()
        if wait <= 0:
            self._flush_preview()
            return
        if self._preview_timer is None:
            from qtpy.QtCore import QTimer

            self._preview_timer = QTimer()
            self._preview_timer.setSingleShot(True)
            self._preview_timer.timeout.connect(self._flush_preview)
        if not self._preview_timer.isActive():
            self._preview_timer.start(max(1, int(wait * 1000)))

    def _flush_preview(self) -> None:
        event, self._pending_preview = self._pending_preview, None
        if event is None or self.job.closed:
            return
        self._preview_shown_at = time.monotonic()
        self._show_preview(event)

    def _preview_scale(self, shape: tuple[int, ...]) -> float:
        """Previews are drawn as large as the largest other image open, so that side by side
        each fills a grid cell like it instead of a corner of one."""
        own = f": {self._preview_name}"
        # a layer's world extent runs between its first and last pixel centres: one pixel more
        sides = [float((np.ptp(layer.extent.world[:, -2:], axis=0) + np.asarray(layer.scale[-2:])).max())
                 for layer in self.viewer.layers
                 if isinstance(layer, napari.layers.Image) and not layer.name.endswith(own)]
        return max(sides) / max(shape) if sides else 1.0

    def _show_preview(self, event: Preview) -> None:
        layers = {"masked": event.masked, "recon": event.reconstruction, "error": event.error, **event.extra}
        if "similarity" in event.extra:   # latent targets: no pixels to show, the cosine map instead
            del layers["recon"], layers["error"]
        added = False
        for prefix, data in layers.items():
            name = f"{prefix}: {self._preview_name}"
            top = max(1e-6, float(data.max())) if prefix == "error" else 1.0
            layer = self.viewer.layers[name] if name in self.viewer.layers else None
            if layer is None:
                cmap = "inferno" if prefix in ("error", "similarity") else "gray"
                scale = (self._preview_scale(data.shape[:2]),) * 2
                self.viewer.add_image(data, name=name, colormap=cmap, contrast_limits=(0.0, top), scale=scale)
                added = True
                continue
            if prefix == "error":  # the error shrinks as training goes on: keep it visible
                layer.contrast_limits = (0.0, top)
            old = layer.data
            if isinstance(old, np.ndarray) and (old.shape, old.dtype) == (data.shape, data.dtype) and old.flags.writeable:
                # in place: a new array makes napari re-check the dims and extents of every layer,
                # 2-3x the Python work per preview (bench_gui_latency.py names it in the long gaps)
                old[...] = data
                layer.refresh(extent=False, highlight=False)
            else:
                layer.data = data
        if added:   # a run's first previews: one cell each, not stacked on one another
            show_side_by_side(self.viewer)
