"""Embedding map dock and searching by a box in the Inspect dock, on the sample data."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from _mim_tiny import tiny

    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain

    out = tmp_path_factory.mktemp("run")
    return pretrain(PretrainConfig.from_dict(tiny(out, max_steps=2, threads=1))).last_checkpoint


def _click(canvas, ax, x: float, y: float) -> None:
    """A left click on the canvas at data coordinates (x, y), as matplotlib delivers a real one."""
    from matplotlib.backend_bases import MouseEvent

    px, py = ax.transData.transform((x, y))
    MouseEvent("button_press_event", canvas, px, py, button=1)._process()


def test_the_map_colours_opens_on_click_and_labels_a_lasso(make_napari_viewer, qtbot, tiny_checkpoint,
                                                            sample_root, tmp_path, monkeypatch):
    import csv

    from mim_workbench_napari._embedding_map import MAP_PREFIX, EmbeddingMapWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    w = EmbeddingMapWidget(viewer)
    viewer.window.add_dock_widget(w, name="Embedding map")     # docked: napari re-reads its choices on layer changes
    w.checkpoint.value = tiny_checkpoint
    w.data.value = str(sample_root / "paediatric")
    w.labels_file.value = str(tmp_path / "labels.csv")
    w.make_map()
    qtbot.waitUntil(lambda: w.worker is None, timeout=90_000)
    assert len(w.rows) == 48 and w.xy.shape == (48, 2)
    assert w.colour.value == "label" and "label" in w.colour.choices
    legend = [t.get_text() for t in w.axes.get_legend().get_texts()]
    assert sorted(legend) == ["Normal (24)", "Pneumonia (24)"], legend
    assert sum(len(c.get_offsets()) for c in w.axes.collections) == 48

    w.canvas.draw()
    target = 7
    _click(w.canvas, w.axes, *w.xy[target])
    opened = [l.name for l in viewer.layers if l.name.startswith(MAP_PREFIX)]
    assert len(opened) == 1, opened
    assert w.colour.value == "label", "opening a layer keeps the colouring"
    # the point clicked, or one drawn exactly on top of it
    assert np.allclose(w.xy[[r["path"] for r in w.rows].index(w.opened[-1])], w.xy[target], atol=1e-3)

    lo, hi = w.xy.min(0) - 1, w.xy.max(0) + 1
    mid = (lo + hi) / 2
    w._on_lasso([(lo[0], lo[1]), (mid[0], lo[1]), (mid[0], hi[1]), (lo[0], hi[1])])
    chosen = int(w.selected.sum())
    assert chosen == int((w.xy[:, 0] < mid[0]).sum()) and w.label_button.enabled
    w.label_text.value = "left cluster"
    w.label_selection()
    with open(tmp_path / "labels.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == chosen and {r["label"] for r in written} == {"left cluster"}
    assert w.colour.value == "labels.csv"
    assert f"left cluster ({chosen})" in [t.get_text() for t in w.axes.get_legend().get_texts()]


def test_mapping_without_a_folder_says_so(make_napari_viewer):
    from napari.utils.notifications import notification_manager

    from mim_workbench_napari._embedding_map import EmbeddingMapWidget

    w = EmbeddingMapWidget(make_napari_viewer())
    before = len(notification_manager.records)
    w.make_map()
    assert w.worker is None and "Choose a checkpoint and a folder" in str(notification_manager.records[before:])


def test_a_search_box_finds_its_image_and_shows_where_others_match(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                    sample_root, tmp_path, monkeypatch):
    from mim_workbench_napari._layers import viewer_grid
    from mim_workbench.io import read_image
    from mim_workbench_napari._explain_panel import BOX_PREFIX
    from mim_workbench_napari._inspect_widget import InspectWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    path = sample_root / "paediatric" / "images" / "km_p00009.png"
    layer = viewer.add_image(read_image(path).data, name="child")
    w = InspectWidget(viewer)
    w.checkpoint.value = tiny_checkpoint
    w.image.value = layer
    panel = w.explain_panel
    panel.draw_box()
    box_layer = viewer.layers[BOX_PREFIX + "child"]
    assert box_layer.mode == "add_rectangle"
    box_layer.add_rectangles(np.array([[40, 30], [150, 120]]))
    assert panel.search_box(layer) == (40.0, 30.0, 150.0, 120.0)
    panel.data.value = str(sample_root / "paediatric")
    panel.k.value = 3
    panel.find_similar()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=90_000)
    names = [l.name for l in viewer.layers if l.name.startswith("similar ")]
    assert names[0].startswith("similar 1: km_p00009 (d=0.000, Pneumonia)") and names[1] == "similar 1 box", names
    assert len(names) == 6 and viewer_grid(w.viewer).stride == 2 and "region" in panel.status.value
    assert all(len(h["box"]) == 4 for h in panel.neighbours)

    from napari.utils.notifications import notification_manager

    before = len(notification_manager.records)
    box_layer.data = [np.array([[300, 300], [300, 400], [400, 400], [400, 300]])]
    panel.find_similar()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=90_000)
    assert "failed" in panel.status.value
    assert "lies outside the image (224×224 pixels)" in str(notification_manager.records[before:])
