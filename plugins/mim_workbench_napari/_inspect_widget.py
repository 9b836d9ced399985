"""Inspect dock: masked input, reconstruction, reconstruction + visible and error for any
image layer (also one never trained on), side by side, with the masked-pixel PSNR.

The reconstruction itself is :func:`mim_workbench.inference.reconstruct`; this widget
runs it off the GUI thread and writes the results into layers named after the image.

Large images (multiscale layers, or more than :data:`._multiscale.TILED_THRESHOLD_PIXELS` pixels)
go tile by tile instead (:func:`~mim_workbench.inference.tiled_reconstruct.iter_reconstruct_tiled`):
``recon: NAME`` and ``error: NAME`` become multiscale layers over the zarr maps the
run writes, and are refreshed after every finished band of rows, so the
reconstruction appears while it runs.  The layer's own arrays are tiled (a file-backed
pyramid or an in-memory array alike), so no source file is needed.
"""

from __future__ import annotations

import napari  # the viewer annotation must resolve: napari injects it by type
import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FloatSlider, ProgressBar, PushButton,
                              SpinBox)

# Imported here, on the main thread, not lazily in the worker: timm pulls in torchvision and
# triton, and loading triton's LLVM from a worker thread after napari made its GL context
# segfaulted (Mesa/Xvfb).
from mim_workbench.inference.reconstruct import ReconstructionResult, model_from_checkpoint, reconstruct
from mim_workbench.models.render import METHOD_PICTURES

from ._explain_panel import MAP_LAYERS, SIMILAR_PREFIX, ExplainPanel
from ._layers import show_side_by_side, viewer_grid
from ._multiscale import ScratchMaps, wants_tiled
from ._self_check import arm_from_env
from ._status import job_handlers, path_edit, status_label

TILED_OUTPUTS = (("recon", "reconstruction"), ("error", "error"))

OUTPUTS = (("masked", "masked"), ("recon", "reconstruction"), ("recon+visible", "recon_plus_visible"),
           ("error", "error"))
#: the methods' own pictures, shown when the result has them: BEiT's token maps, the cosine map of latent targets
METHOD_OUTPUTS = tuple((label, field) for field, label in METHOD_PICTURES)
_OWN_PREFIXES = (tuple(f"{p}: " for p, _ in OUTPUTS + METHOD_OUTPUTS) + ("masking preview: ",)
                 + tuple(f"{p}: " for p, _, _ in MAP_LAYERS) + ("features: ", "class ", SIMILAR_PREFIX))


class InspectWidget(Container):
    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        arm_from_env(napari_viewer)
        self.checkpoint = path_edit(label="Checkpoint", mode="r", value="",
                                    placeholder="a pretraining checkpoint: RUN/ckpt-N/meta.json")
        self.image = ComboBox(label="Image", choices=self._image_layers)
        self.region = ComboBox(label="Region", choices=self._label_layers, nullable=True, value=None)
        self.strategy = ComboBox(label="Masking", choices=["as trained", "random", "block", "region"],
                                 value="as trained")
        self.ratio = FloatSlider(label="Mask ratio", min=0.05, max=0.95, step=0.05, value=0.75)
        self.seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self.run_button = PushButton(text="Reconstruct")
        self.resample = PushButton(text="Re-sample mask")
        self.side_by_side = CheckBox(text="Side by side", value=False)
        self.metrics = status_label("Choose a pretraining checkpoint (Pretrain fills it in when a run "
                                    "saves one) and an image layer, then Reconstruct.")
        self.progress = ProgressBar(label="Tiles", min=0, max=100, value=0, visible=False)
        self.explain_panel = ExplainPanel(napari_viewer, self.checkpoint, self.image)
        self.extend([self.checkpoint, self.image, self.region, self.strategy, self.ratio, self.seed,
                     self.run_button, self.resample, self.side_by_side, self.metrics, self.progress,
                     self.explain_panel])
        self._failed, self._done = job_handlers(self, label=self.metrics, button=self.run_button,
                                                worker_attr="worker", action="Reconstruction")
        self.run_button.changed.connect(self.reconstruct)
        self.resample.changed.connect(self._resample)
        self.side_by_side.changed.connect(self._toggle_grid)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._models: dict[str, object] = {}
        self.worker = None
        self.last_result = None
        self.last_tiled: dict | None = None          # stats of the last tiled run (output, metrics, tiles)
        self.band_updates: list[tuple[int, int, int, int]] = []   # (row0, row1, tiles done, total) per band shown
        self.maps = ScratchMaps("inspect")            # the zarr maps tiled layers read
        self.native.destroyed.connect(self.maps.clear)

    def _image_layers(self, _=None) -> list:
        from napari.layers import Image

        return [l for l in self.viewer.layers if isinstance(l, Image) and not l.name.startswith(_OWN_PREFIXES)]

    def _label_layers(self, _=None) -> list:
        from napari.layers import Labels

        return [l for l in self.viewer.layers if isinstance(l, Labels)]

    def _refresh(self, event=None) -> None:
        self.image.reset_choices()
        self.region.reset_choices()

    def _resample(self) -> None:
        self.seed.value = int(self.seed.value) + 1
        self.reconstruct()

    def _toggle_grid(self) -> None:
        if self.side_by_side.value:
            show_side_by_side(self.viewer)
            return
        viewer_grid(self.viewer).enabled = False
        self.viewer.reset_view()  # the grid's end changes the scene: show all of it, not a corner

    # ------------------------------------------------------------------ run
    def _model(self, path: str):
        if path not in self._models:
            self._models = {path: model_from_checkpoint(path)}  # keep one model: memory is finite
        return self._models[path]

    def reconstruct(self) -> None:
        """Reconstruct the chosen image layer with the chosen checkpoint in the background (tile by
        tile when it is large); the pictures arrive as layers aligned with the image."""
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_error

        ckpt = str(self.checkpoint.value)
        img = self.image.value
        if img is None or ckpt in ("", "."):
            show_error("Choose a checkpoint and an image layer to reconstruct.")
            return
        strategy = None if self.strategy.value == "as trained" else self.strategy.value
        if strategy == "region" and self.region.value is None:
            show_error("Region-guided masking needs a region layer: paint, import or propose one first.")
            return
        ratio, seed = float(self.ratio.value), int(self.seed.value)
        if wants_tiled(img):
            self._reconstruct_tiled(ckpt, img, strategy, ratio, seed)
            return
        data = np.asarray(img.data)
        region = None if self.region.value is None else np.asarray(self.region.value.data)

        def work():
            """Load (or reuse) the model and reconstruct, off the GUI thread."""
            model, loaded = self._model(ckpt)
            chosen = strategy or loaded.config.get("strategy") or None
            if chosen == "region" and region is None:
                chosen = "random"  # trained region-guided, but this image has no region yet
            return reconstruct(model, data, region_mask=region, strategy=chosen, ratio=ratio, seed=seed)

        self.metrics.value = "reconstructing…"
        self.run_button.enabled = False
        self.worker = create_worker(work, _ignore_errors=True)  # reported through errored, below
        self.worker.returned.connect(lambda result: self._show(result, img))
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._done)
        self.worker.start()

    # ------------------------------------------------------------------ tiled (large images)
    def _reconstruct_tiled(self, ckpt: str, img, strategy: str | None, ratio: float, seed: int) -> None:
        from mim_workbench.inference.tiled_reconstruct import iter_reconstruct_tiled

        from ._multiscale import layer_pyramid

        pyr = layer_pyramid(img)
        region = None
        if self.region.value is not None:  # painted at any level: its own scale places it on the image
            lab = self.region.value
            region = (np.asarray(lab.data[-1] if lab.multiscale else lab.data), tuple(lab.scale[-2:]))
        out = self.maps.new()

        def work():
            """Reconstruct tile by tile, off the GUI thread, handing on each band written."""
            model, loaded = self._model(ckpt)
            config = dict(loaded.config or {})
            chosen = strategy or config.get("strategy") or None
            if chosen == "region" and region is None:
                chosen = "random"  # trained region-guided, but this image has no region yet
            # the level the model was pretrained on (crop-based runs), as far as this pyramid goes
            level = min(max(0, int(config.get("crop_level") or 0)), len(pyr.levels) - 1)
            return (yield from self.maps.stream(out, lambda stats: iter_reconstruct_tiled(
                model, pyr, out=out, level=level, region_mask=region, strategy=chosen, ratio=ratio, seed=seed,
                stats=stats)))

        self.metrics.value = "reconstructing tile by tile…"
        self.progress.value = 0
        self.progress.visible = True
        self.band_updates = []
        self.run_button.enabled = False
        self.worker = self.maps.start(work, on_band=lambda item: self._show_band(item, img),
                                      on_done=lambda stats: self._show_tiled(stats, img),
                                      on_error=self._failed, on_finished=self._done)

    def _show_band(self, item, img) -> None:
        band, output = item
        if self.maps.shown.get(img.name) != output.path:
            self._add_tiled_layers(output, img)
        for prefix, key in TILED_OUTPUTS:
            layer = self.viewer.layers[f"{prefix}: {img.name}"]
            if prefix == "error":  # the coarsest level is a few hundred pixels: cheap to scan
                top = float(np.max(np.asarray(output.levels(key)[-1][...])))
                layer.contrast_limits = (0.0, max(1e-6, top))
            layer.refresh()
        self.band_updates.append((band.row0, band.row1, band.tiles_done, band.tiles_total))
        self.progress.value = int(round(100 * band.tiles_done / max(1, band.tiles_total)))
        self.metrics.value = (f"tiled: {band.tiles_done}/{band.tiles_total} tiles, rows up to {band.row1} "
                              f"of {output.shape[0]}")

    def _add_tiled_layers(self, output, img) -> None:
        """Multiscale layers over the zarr maps being written (replacing this image's older outputs)."""
        for prefix, _attr in OUTPUTS:  # a non-tiled run's masked / recon+visible do not belong to this one
            name = f"{prefix}: {img.name}"
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        for prefix, key in TILED_OUTPUTS:
            # zarr arrays, not dask: every refresh reads what is on disk now (dask's cache would not)
            levels = output.levels(key)
            self.viewer.add_image(
                levels, name=f"{prefix}: {img.name}", multiscale=True, scale=tuple(output.scale),
                translate=img.translate[-2:], colormap="inferno" if prefix == "error" else "gray",
                contrast_limits=(0.0, 1e-6) if prefix == "error" else (0.0, 1.0),
                metadata={"mim_workbench_tiled": str(output.path)},
            )
        self.maps.show(img.name, output.path)

    def _show_tiled(self, stats: dict | None, img) -> None:
        if stats is None:    # cut short: the dock or the viewer is closing
            return
        self.last_tiled = stats
        self.progress.value = 100
        m = stats.get("metrics") or {}
        level = stats.get("level", 0)
        if "psnr" in m:
            self.metrics.value = (f"tiled, level {level}, {stats.get('tiles', 0)} tiles: masked-pixel PSNR "
                                  f"{m['psnr']:.2f} dB (mean-fill baseline {m['psnr_baseline']:.2f} dB)  "
                                  f"ratio {m.get('ratio', 0):.2f}, {m.get('strategy', '')}")
        else:
            self.metrics.value = f"tiled, level {level}: {stats.get('tiles', 0)} tiles, no masked pixel"

    def _show(self, result, img) -> None:
        self.last_result = result
        self.progress.visible = False
        for prefix, _attr in TILED_OUTPUTS:  # a multiscale map of an earlier tiled run cannot take these
            name = f"{prefix}: {img.name}"
            if name in self.viewer.layers and self.viewer.layers[name].multiscale:
                self.viewer.layers.remove(name)
        for prefix, attr in self._outputs(result):
            canvas = getattr(result, attr).astype(np.float32)
            data = result.to_source(canvas, order=0 if prefix == "error" else 1).astype(np.float32)
            name = f"{prefix}: {img.name}"
            if name in self.viewer.layers:
                self.viewer.layers[name].data = data
                if prefix == "error":
                    self.viewer.layers[name].contrast_limits = (0.0, max(1e-6, float(data.max())))
            else:
                self.viewer.add_image(
                    data, name=name, scale=img.scale[-2:], translate=img.translate[-2:],
                    colormap="inferno" if prefix in ("error", "similarity") else "gray",
                    contrast_limits=(0.0, max(1e-6, float(data.max()))) if prefix == "error" else (0.0, 1.0),
                )
        m = result.metrics
        if "cosine_masked" in m:
            cos = m["cosine_masked"]
            self.metrics.value = ("no masked patch inside the image" if cos is None else
                                  f"cosine of predicted and teacher features on masked patches {cos:.3f}  "
                                  f"ratio {m.get('ratio', 0):.2f}, {m.get('strategy', '')}")
            return
        if m.get("psnr") is None:
            self.metrics.value = "no masked pixel inside the image: raise the mask ratio"
            return
        bih = f", biharmonic {m['psnr_biharmonic']:.2f} dB" if m.get("psnr_biharmonic") is not None else ""
        tokens = (f"masked-token accuracy {m['token_acc']:.3f} (most frequent token {m['token_base']:.3f})  "
                  if "token_acc" in m else "")
        self.metrics.value = (f"{tokens}masked-pixel PSNR {m['psnr']:.2f} dB (baselines: mean fill "
                              f"{m['psnr_baseline']:.2f} dB{bih})  ratio {m.get('ratio', 0):.2f}, {m.get('strategy', '')}")

    @staticmethod
    def _outputs(result: ReconstructionResult) -> list[tuple[str, str]]:
        """(layer prefix, result field) of the pictures ``result`` has: latent targets have no
        reconstruction, only the masked input, the error and the cosine map."""
        own = [(p, a) for p, a in METHOD_OUTPUTS if getattr(result, a, None) is not None]
        plain = [(p, a) for p, a in OUTPUTS if not (result.similarity is not None and a.startswith("recon"))]
        return plain + own
