"""The Workbench dock's learning panel: learn a region from the images painted so far.

Every image layer with a painted (non-empty) region layer is an example; the model is
:func:`mim_workbench.regions.learned.learn_regions`, the same as ``mim-workbench regions
learn``, trained in a napari thread worker. When it is done, the model is saved, offered as
"learned model" in the dock's Propose menu (for one image and for a folder), and its
proposals appear on the other open images as editable region layers: correct them and learn
again, and the corrections become examples too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, ProgressBar, PushButton, SpinBox

from ._status import job_handlers, path_edit, short_path, start_job, status_label

if TYPE_CHECKING:
    import napari

    from mim_workbench.regions.learned import LearnProgress, RegionModel

LEARNED = "learned model"
LEARN_HINT = ("Paint the region on a few images (New region layer), then Learn: the model proposes it "
              "on the other open images and on folders.")


def default_model_path() -> Path:
    """``~/mim-workbench-runs/regions/region-model.safetensors``: where the learned model is saved by default."""
    return Path.home() / "mim-workbench-runs" / "regions" / "region-model.safetensors"


class LearnRegionsPanel:
    """Mixed into the Workbench dock, which has ``viewer``, ``preset``, ``_image_layers``,
    ``_set_region``; :meth:`_build_learn_panel` makes the widgets and returns them."""

    region_model_path: Path | None = None

    def _build_learn_panel(self) -> Container:
        self.learn_seconds = SpinBox(label="Learn for (s)", min=10, max=3600, value=110)
        self.learn_out = path_edit(label="Region model", mode="w", filter="*.safetensors",
                                   value=str(default_model_path()), placeholder="where the learned model is saved")
        self.learn_button = PushButton(text="Learn regions from painted images")
        self.learn_progress = ProgressBar(label="Learning", min=0, max=1, value=0, visible=False)
        self.learn_status = status_label(LEARN_HINT)
        self.learn_worker = None
        self._learn_failed, self._learn_done = job_handlers(
            self, label=self.learn_status, button=self.learn_button, worker_attr="learn_worker", action="Learning")
        self.learn_button.changed.connect(self.learn_from_painted)
        return Container(widgets=[self.learn_seconds, self.learn_out, self.learn_button, self.learn_progress,
                                  self.learn_status], labels=True)

    def painted_examples(self) -> list[tuple[napari.layers.Image, napari.layers.Labels]]:
        """(image layer, region layer) pairs whose region has paint, on the image's own grid."""
        pairs = []
        for img in self._image_layers():
            name = f"region: {img.name}"
            if img.multiscale or name not in self.viewer.layers:
                continue
            region = self.viewer.layers[name]
            if np.asarray(region.data).shape == np.asarray(img.data).shape[:2] and np.asarray(region.data).any():
                pairs.append((img, region))
        return pairs

    def learn_from_painted(self) -> None:
        """Learn from the painted images in the background (one run at a time)."""
        from napari.utils.notifications import show_error

        pairs = self.painted_examples()
        if not pairs:
            show_error("Paint the region on at least one image first (New region layer, then the brush).")
            return
        if self.learn_worker is not None:
            return
        images = [np.asarray(img.data, dtype=np.float32) for img, _ in pairs]
        masks = [(np.asarray(region.data) > 0).astype(np.uint8) for _, region in pairs]
        name = self.preset.value if self.preset.value != LEARNED else "region"
        self.learn_button.enabled = False
        self.learn_progress.visible = True
        self.learn_status.value = f"learning from {len(pairs)} painted image(s)…"
        self.learn_worker = start_job(
            _learn_job, images, masks, name, float(self.learn_seconds.value), on_yield=self._learn_step,
            on_done=lambda model: self._learned(model, [img.name for img, _ in pairs]),
            on_error=self._learn_failed, on_finished=self._learn_done)

    def _learn_step(self, progress: LearnProgress) -> None:
        self.learn_progress.max = max(1, progress.total)
        self.learn_progress.value = progress.step
        left = "" if progress.eta_s is None else f", about {int(progress.eta_s) + 1} s left"
        self.learn_status.value = f"learning: step {progress.step}/{progress.total}, loss {progress.loss:.3f}{left}"

    def _learned(self, model: RegionModel, examples: list[str]) -> None:
        from napari.utils.notifications import show_info

        out = str(self.learn_out.value)
        path = model.save(out if out not in ("", ".") else default_model_path())
        self.region_model_path = path
        if LEARNED not in self.preset.choices:
            self.preset.choices = [*self.preset.choices, LEARNED]
        self.preset.value = LEARNED
        proposed = self._propose_on_unpainted(model, set(examples))
        self.learn_progress.visible = False
        self.learn_status.value = (f"learned from {len(examples)} image(s) in {model.info['seconds']:.0f} s; "
                                   f"saved {short_path(path)}; proposed on {proposed} other image(s)")
        show_info(f"Learned the region from {len(examples)} painted image(s); proposals on {proposed} other "
                  "image(s): correct them and learn again")

    def _propose_on_unpainted(self, model: RegionModel, examples: set[str]) -> int:
        count = 0
        for img in self._image_layers():
            name = f"region: {img.name}"
            painted = name in self.viewer.layers and np.asarray(self.viewer.layers[name].data).any()
            if img.multiscale or img.name in examples or painted:
                continue
            self._set_region(img, model.propose(np.asarray(img.data)))
            count += 1
        return count


def _learn_job(images: list[np.ndarray], masks: list[np.ndarray], name: str, seconds: float):
    """Generator for the thread worker: yields progress, returns the model."""
    import torch

    from mim_workbench.regions.learned import RegionModelConfig, iter_learning

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the small network is fastest on one core, and the viewer keeps the other
    try:
        config = RegionModelConfig(name=name, parts=2 if name == "lungs" else 0)
        return (yield from iter_learning(images, masks, config=config, seconds=seconds))
    finally:
        torch.set_num_threads(before)
