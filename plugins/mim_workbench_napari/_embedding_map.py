"""Embedding map dock: every image of a folder as a point, placed by what the encoder sees.

The folder is embedded once (the same cached index as the Inspect dock's Similar cases) and
laid out in 2-D (:func:`mim_workbench.inference.embedding_map.project`: PCA, t-SNE, UMAP).
Points are coloured by label, patient or any column of the folder's table; clicking a point
opens its image; a lasso drawn around points selects them, and *Label selection* writes their
label to a manifest CSV that ``finetune --data`` reads: a fast way to label a few dozen
images.  Embedding and projecting run in the background.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, LineEdit, PushButton

from ._status import job_handlers, path_edit, start_job, status_label

MAP_PREFIX = "map: "
#: categories drawn in their own colour; the rest share "other"
MAX_COLOURS = 10
NO_VALUE = "(none)"
#: how near (screen pixels) a click must fall to a point to open it
PICK_PIXELS = 6


class EmbeddingMapWidget(Container):
    """The dock: choose a checkpoint and a folder, map, colour, click, lasso, label."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.checkpoint = path_edit(label="Checkpoint", mode="r", value="",
                                    placeholder="a pretraining or fine-tuning checkpoint")
        self.data = path_edit(label="Folder", mode="d", value="", placeholder="the images to map")
        self.projection = ComboBox(label="Projection", choices=["pca", "tsne", "umap"], value="pca")
        self.map_button = PushButton(text="Map the folder")
        # choices from a function: napari re-reads a docked widget's choices whenever layers change
        self.colour = ComboBox(label="Colour by", choices=self._colour_choices, nullable=True, value=None)
        self.label_text = LineEdit(label="Label", value="")
        self.labels_file = path_edit(label="Labels file", mode="w", value="",
                                     placeholder="a CSV manifest (default: map-labels.csv in the folder)")
        self.label_button = PushButton(text="Label selection", enabled=False)
        self.status = status_label("Map a folder: each point is an image. Click a point to open it; "
                                   "draw a lasso around points to select and label them.")
        self.canvas, self.axes = _figure()
        self.extend([self.checkpoint, self.data, self.projection, self.map_button, self.colour,
                     self.label_text, self.labels_file, self.label_button, self.status])
        self.native.layout().addWidget(self.canvas)
        self._failed, self._done = job_handlers(self, label=self.status, button=self.map_button,
                                                worker_attr="worker", action="Mapping")
        self.map_button.changed.connect(self.make_map)
        self.colour.changed.connect(self.draw)
        self.label_button.changed.connect(self.label_selection)
        self.canvas.mpl_connect("button_press_event", self._on_click)
        self.worker = None
        self.rows: list[dict[str, Any]] = []
        self.xy = np.zeros((0, 2), np.float32)
        self.columns: dict[str, list[str | None]] = {}
        self.selected = np.zeros(0, bool)
        self.opened: list[str] = []
        self._lasso = None

    def _colour_choices(self, *_: Any) -> list[str]:
        """What the map can be coloured by: the columns read with the last map."""
        return list(getattr(self, "columns", {}))

    # ------------------------------------------------------------------ mapping
    def make_map(self) -> None:
        """Embed the folder (or reuse its index) and project it, in the background."""
        from napari.utils.notifications import show_error

        from ._explain_panel import index_folder

        ckpt, folder, method = str(self.checkpoint.value), str(self.data.value), str(self.projection.value)
        if ckpt in ("", ".") or folder in ("", ".") or not Path(folder).is_dir():
            show_error("Choose a checkpoint and a folder of images first.")
            return

        def work():
            """Embed, project and read the folder's table, off the GUI thread."""
            from mim_workbench.inference.embed import embed_dataset
            from mim_workbench.inference.embedding_map import colour_columns, project

            index = embed_dataset(ckpt, folder, index_folder(ckpt, folder))
            yield len(index.rows)
            return index.rows, project(index.vectors, method), colour_columns(index.rows, folder)

        self.status.value = "embedding the folder…"
        self.map_button.enabled = False
        self.worker = start_job(work, on_yield=self._embedded, on_done=self._show, on_error=self._failed,
                                on_finished=self._done)

    def _embedded(self, count: int) -> None:
        """The index is ready: say so while the projection runs."""
        self.status.value = f"{count} images embedded; projecting…"

    def _show(self, result: tuple[list[dict[str, Any]], np.ndarray, dict[str, list[str | None]]]) -> None:
        """Keep the map and draw it, coloured by label when the folder has labels."""
        self.rows, self.xy, self.columns = result
        self.selected = np.zeros(len(self.rows), bool)
        self._add_labels_file_column()
        self.colour.reset_choices()
        self.colour.value = next(iter(self.columns), None)
        self.draw()
        self.status.value = (f"{len(self.rows)} images mapped ({self.projection.value}); click a point to open it, "
                             "draw a lasso to select")

    def draw(self, *_: Any) -> None:
        """Redraw the points, one colour per value of the chosen column, selected points ringed."""
        from matplotlib.widgets import LassoSelector

        ax = self.axes
        ax.clear()
        values = self.columns.get(self.colour.value) if self.colour.value else None
        groups = _groups(values, len(self.rows))
        for i, (name, members) in enumerate(groups.items()):
            colour = "lightgrey" if name == NO_VALUE else f"C{i % 10}"
            ax.scatter(self.xy[members, 0], self.xy[members, 1], s=14, color=colour, label=f"{name} ({len(members)})")
        if self.selected.any():
            ax.scatter(self.xy[self.selected, 0], self.xy[self.selected, 1], s=40, facecolors="none",
                       edgecolors="black", linewidths=1.2)
        if len(groups) > 1:
            ax.legend(fontsize=7, loc="best", markerscale=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{len(self.rows)} images, {self.selected.sum()} selected", fontsize=8)
        self._lasso = LassoSelector(ax, self._on_lasso, button=[3])    # right button: the left one picks
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ interaction
    def _on_click(self, event: Any) -> None:
        """A left click on a point (within ``PICK_PIXELS`` of it on screen) opens its image."""
        if event.button != 1 or event.inaxes is not self.axes or not len(self.rows):
            return
        screen = self.axes.transData.transform(self.xy)
        dist = np.hypot(screen[:, 0] - event.x, screen[:, 1] - event.y)
        nearest = int(np.argmin(dist))
        if dist[nearest] <= PICK_PIXELS:
            self.open_image(nearest)

    def open_image(self, row: int) -> None:
        """Open image ``row`` of the map as a layer (once; clicking again selects it)."""
        from mim_workbench.io import read_image

        path = self.rows[row]["path"]
        name = MAP_PREFIX + Path(path).stem
        if name not in self.viewer.layers:
            loaded = read_image(path)
            self.viewer.add_image(loaded.data, name=name, colormap="gray", scale=loaded.scale)
        self.viewer.layers.selection.active = self.viewer.layers[name]
        self.opened.append(path)
        label = self.rows[row].get("label")
        self.status.value = f"opened {Path(path).name}" + (f" ({label})" if label else "")

    def _on_lasso(self, vertices: list[tuple[float, float]]) -> None:
        """Points inside the lasso become the selection."""
        from matplotlib.path import Path as Polygon

        if len(vertices) < 3:
            return
        self.selected = Polygon(vertices).contains_points(self.xy)
        self.label_button.enabled = bool(self.selected.any())
        self.status.value = f"{int(self.selected.sum())} images selected; type a label and press Label selection"
        self.draw()

    def label_selection(self) -> None:
        """Write the label to the labels file for every selected image, then colour by that file."""
        from napari.utils.notifications import show_error, show_info

        from mim_workbench.errors import MimError
        from mim_workbench.inference.embedding_map import save_labels

        label = str(self.label_text.value).strip()
        if not label or not self.selected.any():
            show_error("Select points with a lasso (right mouse button) and type a label first.")
            return
        chosen = [self.rows[i] for i in np.flatnonzero(self.selected)]
        target = self._labels_path()
        try:
            save_labels(target, {r["path"]: label for r in chosen}, {r["path"]: r.get("patient") for r in chosen})
        except MimError as exc:
            show_error(f"Labels not saved: {exc}")
            return
        self._add_labels_file_column()
        self.colour.reset_choices()
        self.colour.value = target.name
        self.draw()
        show_info(f"Labelled {len(chosen)} images {label!r} in {target}")

    def _labels_path(self) -> Path:
        """The labels file chosen, or ``map-labels.csv`` in the mapped folder."""
        chosen = str(self.labels_file.value)
        return Path(chosen) if chosen not in ("", ".") else Path(str(self.data.value)) / "map-labels.csv"

    def _add_labels_file_column(self) -> None:
        """The labels file's labels as a colour column, when it exists (a file that is not a
        labels manifest gives an empty column; saving to it says why)."""
        from mim_workbench.errors import MimError
        from mim_workbench.inference.embedding_map import read_labels

        target = self._labels_path()
        if not target.is_file() or not self.rows:
            return
        try:
            given = read_labels(target)
        except MimError:
            given = {}
        self.columns[target.name] = [given.get(str(Path(r["path"]).resolve())) for r in self.rows]


def _figure() -> tuple[Any, Any]:
    """A matplotlib canvas for the dock (Qt agg backend, no pyplot state) and its axes."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=90, layout="tight")
    canvas = FigureCanvasQTAgg(fig)
    canvas.setMinimumHeight(320)
    ax = fig.add_subplot()
    ax.set_xticks([])
    ax.set_yticks([])
    return canvas, ax


def _groups(values: list[str | None] | None, n: int) -> dict[str, np.ndarray]:
    """Row indices per colour: the ``MAX_COLOURS`` commonest values, "other", and no value."""
    if values is None:
        return {"images": np.arange(n)}
    counts = Counter(v for v in values if v is not None)
    kept = [v for v, _ in counts.most_common(MAX_COLOURS)]
    names = [v if v in kept else ("other" if v is not None else NO_VALUE) for v in values]
    order = [*kept, "other", NO_VALUE]
    out = {name: np.flatnonzero(np.array(names) == name) for name in order}
    return {name: idx for name, idx in out.items() if len(idx)}
