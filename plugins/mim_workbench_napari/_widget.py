"""The Workbench dock widget: data & regions, masking preview.

Thin skin: every computation (reading masks, building masks, saving) is a core call;
this module only wires napari layers and magicgui controls to it.

Multiscale images (mammograms, slides): the region layer lives at a reduced pyramid
level (longest side <= :data:`REGION_MAX_SIDE`) with that level's ``scale``, so it lies
on the image; auto-propose runs :func:`~mim_workbench.regions.large.propose_region_large`
there, and the masking preview is drawn on the same grid (its patch geometry follows
the letterboxed training size, so it does not depend on the level).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import (ComboBox, Container, FloatSlider, PushButton, SpinBox, CheckBox)

from mim_workbench.errors import MimError

from ._folder_regions import FolderRegionsPanel
from ._learn_regions import LEARNED, LearnRegionsPanel
from ._self_check import arm_from_env
from ._status import path_edit, status_label

import napari  # the viewer annotation must resolve: napari injects it by type

PREVIEW_PREFIX = "masking preview: "
# layers the workbench itself makes; they are never offered as inputs
PREVIEW_PREFIXES = (PREVIEW_PREFIX, "masked: ", "recon: ", "recon+visible: ", "error: ")
#: Longest side of the level a multiscale image's region mask is painted at (as region proposals use).
REGION_MAX_SIDE = 1024


def _notify(message: str, error: bool = False) -> None:
    from napari.utils.notifications import show_error, show_info

    (show_error if error else show_info)(message)


EMPTY_HINT = ("Open an image first: File > Open (DICOM, PNG, TIFF, zarr), drop files on the window, "
              "or File > Open Sample > MIM Workbench.")
REGION_HINT = "Next: New region layer to paint the region, or Auto-propose region, or Import mask."


class WorkbenchWidget(LearnRegionsPanel, FolderRegionsPanel, Container):
    """Data & regions: pick the image, create/import/save its region mask, preview masking."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        arm_from_env(napari_viewer)
        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.region = ComboBox(label="Region", choices=self._label_layers, nullable=True)
        self.new_region = PushButton(text="New region layer")
        self.preset = ComboBox(label="Propose", choices=["lungs", "breast", "teeth", "tissue"], value="lungs")
        self.propose = PushButton(text="Auto-propose region")
        self.import_path = path_edit(label="Import mask", mode="r", filter="*.png *.tif *.tiff *.npy *.dcm",
                                     placeholder="a mask file (PNG, TIFF, NumPy, DICOM SEG)")
        self.save_path = path_edit(label="Save mask as", mode="w", filter="*.png *.tif *.tiff *.npy",
                                   placeholder="where to save the region mask")
        self.save = PushButton(text="Save region mask")
        self.strategy = ComboBox(label="Strategy", choices=["random", "block", "region"], value="region")
        self.ratio = FloatSlider(label="Mask ratio", min=0.05, max=0.95, step=0.05, value=0.75)
        self.patch = SpinBox(label="Patch size", min=4, max=128, value=16)
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.show_preview = CheckBox(text="Show masking preview", value=False)
        self.status = status_label()
        self.extend([self.image, self.region, self.new_region, self.preset, self.propose, self.import_path, self.save_path, self.save,
                     self.strategy, self.ratio, self.patch, self.seed, self.show_preview, self.status])
        self._learn_box = self._build_learn_panel()
        self.native.layout().addWidget(self._learn_box.native)
        self._folder_box = self._build_folder_panel()
        self.native.layout().addWidget(self._folder_box.native)

        self.new_region.changed.connect(self.create_region_layer)
        self.propose.changed.connect(self.propose_region)
        self.import_path.changed.connect(lambda: self.import_region(self.import_path.value))
        self.save.changed.connect(lambda: self.save_region(self.save_path.value))
        for w in (self.image, self.region, self.strategy, self.ratio, self.patch, self.seed, self.show_preview):
            w.changed.connect(self.update_preview)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        self._watched = None
        from qtpy.QtCore import QTimer

        # painting fires many events: save once it pauses for a second
        self._autosave_timer = QTimer()
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.setInterval(1000)
        self._autosave_timer.timeout.connect(self.autosave)
        self._refresh_choices()

    # ------------------------------------------------------------------ layer lists
    def _image_layers(self, _=None) -> list:
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and not l.name.startswith(PREVIEW_PREFIXES)]

    def _label_layers(self, _=None) -> list:
        from napari.layers import Labels

        return [l for l in self.viewer.layers if isinstance(l, Labels) and not l.name.startswith(PREVIEW_PREFIXES)]

    def _refresh_choices(self, event=None) -> None:
        self.image.reset_choices()
        self.region.reset_choices()
        self._hint_first_step()
        if self.region.value is None:
            img = self.image.value
            match = [l for l in self._label_layers() if img is not None and l.name == f"region: {img.name}"]
            if match:
                self.region.value = match[0]
        self._watch_region()

    def _hint_first_step(self) -> None:
        """The empty state says what to do first; a status from an action is left alone."""
        if self.status.value and self.status.value not in (EMPTY_HINT, REGION_HINT):
            return
        if not self._image_layers():
            self.status.value = EMPTY_HINT
        elif not self._label_layers():
            self.status.value = REGION_HINT
        else:
            self.status.value = ""

    def _watch_region(self) -> None:
        layer = self.region.value
        if layer is self._watched:
            return
        if self._watched is not None:
            for ev in ("paint", "data"):
                for slot in (self.update_preview, self._schedule_autosave):
                    try:
                        getattr(self._watched.events, ev).disconnect(slot)
                    except (TypeError, ValueError, AttributeError, RuntimeError):
                        pass
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self.update_preview)
            layer.events.paint.connect(self._schedule_autosave)
            layer.events.data.connect(self._schedule_autosave)

    # ------------------------------------------------------------------ autosave
    def _image_key(self) -> str | None:
        img = self.image.value
        if img is None:
            return None
        return str(img.metadata.get("source") or img.source.path or img.name)

    def _schedule_autosave(self, event=None) -> None:
        self._autosave_timer.start()

    def autosave(self) -> None:
        """Save the region layer as the chosen image's autosave (``.npy``, atomic); an OSError or MimError
        becomes an error notification. Without an image or a region layer: nothing."""
        from ._autosave import autosave_mask

        key, layer = self._image_key(), self.region.value
        if key is None or layer is None:
            return
        try:
            autosave_mask(key, np.asarray(layer.data))
        except (OSError, MimError) as exc:
            _notify(f"Could not autosave the region mask: {exc}", error=True)

    # ------------------------------------------------------------------ regions
    @staticmethod
    def region_grid(img: napari.layers.Image) -> tuple[tuple[int, int], tuple[float, float]]:
        """(shape, scale) of the region mask of ``img``: the image's own grid, or a reduced level of a
        multiscale one (longest side <= :data:`REGION_MAX_SIDE`)."""
        from ._multiscale import layer_level_for_max_side

        _level, shape, scale = layer_level_for_max_side(img, REGION_MAX_SIDE)
        return shape, scale

    def create_region_layer(self) -> None:
        """Add a ``region: NAME`` Labels layer on the image's region grid, in paint mode: the image's autosaved
        mask when one fits, else zeros (uint8). Without an image: an error notification."""
        img = self.image.value
        if img is None:
            _notify("Open an image first: the region layer takes its shape and scale.", error=True)
            return
        from ._autosave import load_autosave

        shape, scale = self.region_grid(img)
        restored = load_autosave(self._image_key(), shape)
        data = restored if restored is not None else np.zeros(shape, dtype=np.uint8)
        layer = self.viewer.add_labels(data, name=f"region: {img.name}",
                                       scale=scale, translate=img.translate[-2:], opacity=0.45)
        layer.mode = "paint"
        self.region.value = layer
        if restored is not None:
            _notify(f"Restored the autosaved region mask of {img.name}.")

    def propose_region(self) -> None:
        """Auto-propose the region with the chosen preset into the region layer (then edit it)."""
        from mim_workbench.regions import propose_region

        img = self.image.value
        if img is None:
            _notify("Open an image first: the region is proposed from its pixels.", error=True)
            return
        scale = None
        try:
            if img.multiscale:  # never the full image: the level of the region grid, read from the pyramid
                from mim_workbench.regions.large import propose_region_large

                from ._multiscale import layer_pyramid

                lm = propose_region_large(layer_pyramid(img), self.preset.value, max_side=REGION_MAX_SIDE)
                mask, scale = lm.mask, lm.scale
            elif self.preset.value == LEARNED:
                from mim_workbench.regions.learned import RegionModel

                mask = RegionModel.load(self.region_model_path).propose(np.asarray(img.data))
            else:
                mask = propose_region(img.data, self.preset.value)
        except MimError as exc:
            _notify(str(exc), error=True)
            return
        self._set_region(img, mask, scale)
        self.status.value = f"proposed {self.preset.value}: {mask.mean():.0%} of the image; paint to correct it"

    def _set_region(self, img, mask: np.ndarray, scale: tuple[float, float] | None = None) -> None:
        name = f"region: {img.name}"
        scale = tuple(scale) if scale is not None else tuple(img.scale[-2:])
        old = self.viewer.layers[name] if name in self.viewer.layers else None
        if old is not None and (old.data.shape != mask.shape or not np.allclose(old.scale[-2:], scale)):
            self.viewer.layers.remove(old)  # another grid: a Labels layer cannot change shape and scale in place
            old = None
        if old is not None:
            old.data = mask
        else:
            self.viewer.add_labels(mask, name=name, scale=scale, translate=img.translate[-2:], opacity=0.45)
        self.region.value = self.viewer.layers[name]
        self.viewer.layers[name].mode = "paint"

    def import_region(self, path: Path | str) -> None:
        """Read the mask at ``path`` onto the image's region grid (nearest-resampled) as its region layer; a
        read error (MimError) becomes a notification. No image, an empty path or a folder: nothing."""
        from mim_workbench.io import read_mask

        img = self.image.value
        if img is None or not str(path) or Path(path).is_dir():
            return
        shape, scale = self.region_grid(img)
        try:
            mask = read_mask(path, shape=shape)
        except MimError as exc:
            _notify(str(exc), error=True)
            return
        self._set_region(img, mask, scale)

    def open_with_region(self, image_path: str | Path, mask_path: str | Path) -> None:
        """Open an image with a mask file as its editable region layer; *Save region mask* with
        no file chosen writes the correction back to that mask file."""
        layers = self.viewer.open(str(image_path), plugin="mim-workbench")
        img = next((l for l in layers if l.__class__.__name__ == "Image"), None)
        if img is None:
            return
        self.image.value = img
        self.import_region(mask_path)
        self.viewer.layers[f"region: {img.name}"].metadata["mask_path"] = str(mask_path)

    def save_region(self, path: Path | str) -> None:
        """Save the region layer to ``path`` (PNG/TIFF as 0/255, ``.npy`` with labels), or with no path to the
        mask file it was opened from; errors (MimError, no layer or file name) become notifications."""
        from mim_workbench.io.mask_writer import save_mask

        layer = self.region.value
        if layer is not None and str(path) in ("", ".") and layer.metadata.get("mask_path"):
            path = layer.metadata["mask_path"]  # a folder proposal being corrected goes back where it came from
        if layer is None or not str(path) or Path(path).is_dir():
            _notify("Choose a region layer and a file name to save to.", error=True)
            return
        try:
            out = save_mask(path, np.asarray(layer.data))
        except MimError as exc:
            _notify(str(exc), error=True)
            return
        self.status.value = f"saved {out.name}"

    # ------------------------------------------------------------------ masking preview
    def update_preview(self, event=None) -> None:
        """Show the chosen strategy's mask as an additive cyan overlay ``masking preview: NAME`` on the region
        grid (removed while the preview is off); the status gives the masked share. MimError: a notification."""
        self._watch_region()
        img = self.image.value
        name = PREVIEW_PREFIX + (img.name if img is not None else "")
        if not self.show_preview.value or img is None:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            return
        from mim_workbench.masking.preview import preview_mask

        shape, scale = self.region_grid(img)
        region = None
        if self.region.value is not None:
            lab = self.region.value
            region = np.asarray(lab.data)
            if region.shape[:2] != shape:  # painted on another grid: bring it onto the preview's by position
                from mim_workbench.io.level_masks import resample_mask

                region = resample_mask(region, shape, mask_scale=tuple(lab.scale[-2:]), scale=scale, lazy=False)
        try:
            masked = preview_mask(shape, strategy=self.strategy.value, ratio=float(self.ratio.value),
                                  patch_size=int(self.patch.value), region=region, seed=int(self.seed.value))
        except MimError as exc:
            _notify(str(exc), error=True)
            return
        overlay = masked.astype(np.float32)
        if name in self.viewer.layers and self.viewer.layers[name].data.shape != overlay.shape:
            self.viewer.layers.remove(name)  # the image changed grid (e.g. replaced by a multiscale one)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = overlay
        else:
            # an additive cyan wash, so the region's labels colour stays readable underneath
            self.viewer.add_image(overlay, name=name, scale=scale, translate=img.translate[-2:],
                                  colormap="cyan", contrast_limits=(0.0, 1.0), blending="additive", opacity=0.45)
        n = int(overlay.sum() / max(1, self.patch.value ** 2))
        self.status.value = f"{self.strategy.value}: {masked.mean():.0%} of pixels masked (~{n} patches)"
