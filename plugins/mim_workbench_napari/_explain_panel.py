"""The Inspect dock's look inside the encoder: attention and feature maps, similar cases.

*Explain* adds, aligned with the chosen image, the class token's attention in the last block
(mean over heads), the attention rollout, the patch features as colours and, for a
fine-tuned classifier, the class-activation map of the predicted class.  *Similar cases*
embeds a data folder once (kept in the workbench's cache, redone when the checkpoint or the
images change) and shows the image's nearest neighbours beside it in grid mode, with their
distances and labels; with a search box drawn on the image it searches by that region, and
each neighbour shows the box where it matches best.  Both run in the background through the
core's ``explain``, ``embed`` and ``region_search`` functions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, PushButton, SpinBox

from ._layers import show_side_by_side
from ._status import job_handlers, path_edit, start_job, status_label

if TYPE_CHECKING:
    import napari
    from magicgui.widgets import ComboBox, FileEdit

    from mim_workbench.inference.explain import Explanation

#: the maps' layers: (prefix, Explanation field, colormap)
MAP_LAYERS = (("attention", "attn_mean", "inferno"), ("rollout", "rollout", "inferno"))
SIMILAR_PREFIX = "similar "
BOX_PREFIX = "search box: "
#: drawn around the best-matching region of each neighbour
MATCH_STYLE = {"edge_color": "yellow", "face_color": "transparent", "edge_width": 3, "shape_type": "rectangle"}


class ExplainPanel(Container):
    """Explain and Similar cases, on the Inspect dock's checkpoint and image."""

    def __init__(self, viewer: napari.viewer.Viewer, checkpoint: FileEdit, image: ComboBox) -> None:
        super().__init__(labels=True)
        self.viewer, self.checkpoint, self.image = viewer, checkpoint, image
        self.explain_button = PushButton(text="Explain (attention, features)")
        self.data = path_edit(label="Similar in", mode="d", value="",
                              placeholder="a folder of images (embedded once, then cached)")
        self.k = SpinBox(label="Neighbours", min=1, max=32, value=6)
        self.box_button = PushButton(text="Draw a search box (optional)")
        self.similar_button = PushButton(text="Similar cases")
        self.status = status_label("Explain shows what the encoder attends to; Similar cases finds the "
                                   "images of a folder it treats as alike (the whole image, or a box drawn on it).")
        self.extend([self.explain_button, self.data, self.k, self.box_button, self.similar_button, self.status])
        self._failed, self._done = job_handlers(self, label=self.status, button=self.explain_button,
                                                worker_attr="worker", action="Explaining")
        self._search_failed, _ = job_handlers(self, label=self.status, button=self.similar_button,
                                              worker_attr="worker", action="Search")
        self.explain_button.changed.connect(self.explain)
        self.similar_button.changed.connect(self.find_similar)
        self.box_button.changed.connect(self.draw_box)
        self.worker = None
        self.neighbours: list[dict[str, Any]] = []

    def _inputs(self) -> tuple[str, Any] | None:
        """(checkpoint, image layer), or None after telling the user what is missing."""
        from napari.utils.notifications import show_error

        ckpt, img = str(self.checkpoint.value), self.image.value
        if img is None or ckpt in ("", "."):
            show_error("Choose a checkpoint and an image layer first.")
            return None
        return ckpt, img

    # ------------------------------------------------------------------ maps
    def explain(self) -> None:
        """Compute the image's maps in the background; they arrive as layers aligned with it.
        Large images (multiscale, or above the tiled threshold) are explained tile by tile."""
        from ._multiscale import wants_tiled

        chosen = self._inputs()
        if chosen is None:
            return
        ckpt, img = chosen
        data, level_scale = _explain_source(img)
        tiled, folder = wants_tiled(img), str(self.data.value)

        def work():
            """Load the encoder, fit the colours (on the image and a few of the Similar-in folder's
            images, when one is chosen; on the tiles of a tiled image) and compute the maps, off
            the GUI thread."""
            from mim_workbench.inference.explain import Explainer, fit_patch_pca

            explainer = Explainer(ckpt)
            if tiled:
                return explainer.explain_tiled(data)
            return explainer.explain(data, pca=fit_patch_pca(explainer, [data, *_some_images(folder)]))
            yield  # a generator, as start_job expects

        self.status.value = "explaining tile by tile…" if tiled else "explaining…"
        self.explain_button.enabled = False
        self.worker = start_job(work, on_yield=lambda _: None,
                                on_done=lambda exp: self._show_maps(exp, img, level_scale),
                                on_error=self._failed, on_finished=self._done)

    def _show_maps(self, exp: Explanation, img: Any, level_scale: float = 1.0) -> None:
        """Add (or update) the map layers of ``img``: aligned with it (its translate, and its scale
        times the maps' own: a large image's maps are computed at a reduced size)."""
        layers = [(f"{prefix}: {img.name}", getattr(exp, field), cmap) for prefix, field, cmap in MAP_LAYERS]
        layers.append((f"features: {img.name}", exp.pca_rgb, None))
        layers += [(f"class {c}: {img.name}", m, "inferno") for c, m in exp.cams.items()]
        scale = np.asarray(img.scale[-2:], float) * level_scale * exp.scale
        for name, data, cmap in layers:
            if name in self.viewer.layers:
                self.viewer.layers[name].data = data
                self.viewer.layers[name].scale = scale
                continue
            extra = {"rgb": True} if cmap is None else {"colormap": cmap, "opacity": 0.5, "blending": "translucent"}
            self.viewer.add_image(data, name=name, scale=scale, translate=img.translate[-2:], **extra)
        cams = f"; class map of {', '.join(exp.cams)}" if exp.cams else ""
        tiles = f" ({exp.tiles} tiles)" if exp.tiles > 1 else ""
        self.status.value = (f"attention of {len(exp.attn_heads)} heads, rollout and feature colours "
                             f"of {img.name}{tiles}{cams}")

    # ------------------------------------------------------------------ similar cases
    def find_similar(self) -> None:
        """Embed the folder (or reuse its index) and show the image's nearest neighbours."""
        from napari.utils.notifications import show_error

        chosen = self._inputs()
        if chosen is None:
            return
        folder = str(self.data.value)
        if folder in ("", ".") or not Path(folder).is_dir():
            show_error("Choose a folder of images to search (Similar in).")
            return
        ckpt, img = chosen
        (data, level_scale), k, box = _explain_source(img), int(self.k.value), self.search_box(img)
        if box is not None:          # drawn in the layer's level-0 pixels
            box = tuple(v / level_scale for v in box)
        out = index_folder(ckpt, folder)

        def work():
            """Embed what the index lacks (progress per batch), then search, off the GUI thread."""
            from mim_workbench.inference.embed import embed_dataset, similar
            from mim_workbench.inference.region_search import similar_region

            index = embed_dataset(ckpt, folder, out)
            yield len(index.rows)
            return similar(index, data, k=k) if box is None else similar_region(index, data, box, k=k)

        self.status.value = "embedding the folder…"
        self.similar_button.enabled = False
        self.worker = start_job(work, on_yield=self._embedded, on_done=lambda hits: self._show_neighbours(hits, img),
                                on_error=self._search_failed, on_finished=self._similar_done)

    def draw_box(self) -> None:
        """Add (or select) the image's search-box layer, ready to draw a rectangle on it."""
        chosen = self._inputs()
        if chosen is None:
            return
        img = chosen[1]
        name = BOX_PREFIX + img.name
        if name not in self.viewer.layers:
            self.viewer.add_shapes(name=name, scale=img.scale[-2:], translate=img.translate[-2:],
                                   edge_color="cyan", face_color="transparent", edge_width=3)
        layer = self.viewer.layers[name]
        self.viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        self.status.value = f"draw a box on {img.name}, then press Similar cases (delete the box to search the whole image)"

    def search_box(self, img: Any) -> tuple[float, float, float, float] | None:
        """The last box drawn on ``img`` (top, left, bottom, right in its pixels), or None."""
        name = BOX_PREFIX + img.name
        if name not in self.viewer.layers or not len(self.viewer.layers[name].data):
            return None
        corners = np.asarray(self.viewer.layers[name].data[-1])[:, -2:]
        (top, left), (bottom, right) = corners.min(0), corners.max(0)
        return float(top), float(left), float(bottom), float(right)

    def _embedded(self, count: int) -> None:
        """The folder's index is ready: say so while the search runs."""
        self.status.value = f"{count} images embedded; searching…"

    def _similar_done(self) -> None:
        """The search ended (found or failed): both buttons work again."""
        self.similar_button.enabled = True
        self._done()

    def _show_neighbours(self, hits: list[dict[str, Any]], img: Any) -> None:
        """The neighbours as image layers beside ``img`` in grid mode, nearest first."""
        from mim_workbench.io import read_image

        for layer in [l for l in self.viewer.layers if l.name.startswith(SIMILAR_PREFIX)]:
            self.viewer.layers.remove(layer)
        by_box = any("box" in hit for hit in hits)
        for rank, hit in enumerate(hits, 1):
            label = f", {hit['label']}" if hit.get("label") else ""
            name = f"{SIMILAR_PREFIX}{rank}: {Path(hit['path']).stem} (d={hit['distance']:.3f}{label})"
            self.viewer.add_image(read_image(hit["path"]).data, name=name, colormap="gray")
            if by_box:    # the match's box right above its image: the two share a grid cell (stride 2)
                top, left, bottom, right = hit["box"]
                rect = np.array([[top, left], [top, right], [bottom, right], [bottom, left]], dtype=float)
                self.viewer.add_shapes([rect], name=f"{SIMILAR_PREFIX}{rank} box", **MATCH_STYLE)
        show_side_by_side(self.viewer, 2 if by_box else 1)
        self.neighbours = hits
        what = "the search box's region" if by_box else "the image"
        self.status.value = (f"{len(hits)} images of the folder most like {what}, nearest first (cosine distance)"
                             + ("; yellow: where each matches best" if by_box else ""))


def _explain_source(img: Any) -> tuple[Any, float]:
    """The array to explain for layer ``img`` and its pixels' size in the layer's level-0 pixels:
    for a multiscale layer the coarsest level still at least ``MAX_MAP_SIDE`` long (the maps are
    computed at that size anyway), else its finest; a plain layer's data as it is."""
    from mim_workbench.inference.explain import MAX_MAP_SIDE

    if not img.multiscale:
        return img.data, 1.0
    levels = list(img.data)
    big = [lv for lv in levels if max(lv.shape[:2]) >= MAX_MAP_SIDE]
    chosen = big[-1] if big else levels[0]
    return chosen, levels[0].shape[0] / chosen.shape[0]


def index_folder(checkpoint: str, folder: str) -> Path:
    """Where the embeddings of ``folder`` under ``checkpoint`` are kept: the workbench's cache."""
    from mim_workbench.io.cache import cache_base

    key = hashlib.sha256(f"{Path(checkpoint).resolve()}|{Path(folder).resolve()}".encode()).hexdigest()[:20]
    return cache_base() / "embeddings" / key


def _some_images(folder: str, count: int = 15) -> list[Path]:
    """Up to ``count`` images of ``folder`` spread over it (none when no folder is chosen)."""
    if folder in ("", ".") or not Path(folder).is_dir():
        return []
    from mim_workbench.io.datasets import discover

    samples = list(discover(folder).samples)
    step = max(1, len(samples) // count)
    return [s.image for s in samples[::step][:count]]
