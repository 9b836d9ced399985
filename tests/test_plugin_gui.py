"""napari plugin: manifest, reader, writer, sample data, docked workbench (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_manifest_validates():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("mim-workbench")
    assert pm.name == "mim-workbench"
    keys = {s.key for s in pm.contributions.sample_data}
    assert {"chest_xray", "dicom", "mammogram"} <= keys


def test_reader_opens_dicom_folder_and_masks(sample_root):
    from mim_workbench_napari._reader import get_reader

    reader = get_reader(str(sample_root / "dicom"))
    assert reader is not None
    layers = reader(str(sample_root / "dicom"))
    assert len(layers) == 2
    for data, kwargs, kind in layers:
        assert kind == "image" and data.dtype == np.float32
        assert kwargs["scale"][0] > 0
    mask_layers = reader(str(sample_root / "masks" / "cxr0162.png"))
    assert mask_layers[0][2] == "labels" and set(np.unique(mask_layers[0][0])) <= {0, 1}
    assert get_reader(str(sample_root / "LICENSES.md")) is None


def test_reader_bad_file_notifies_not_raises(tmp_path):
    from napari.utils.notifications import notification_manager

    from mim_workbench_napari._reader import read_layers

    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    before = len(notification_manager.records)
    assert read_layers(str(bad)) == []
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("broken.png" in m for m in messages), messages


def test_writer_round_trip(tmp_path):
    from mim_workbench.io import read_mask
    from mim_workbench_napari._writer import write_region_mask

    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:25] = 1
    out = write_region_mask(str(tmp_path / "m.png"), mask, {})
    assert np.array_equal(read_mask(out[0]), mask)


def test_workbench_docks_with_sample_and_previews_masking(make_napari_viewer, tmp_path):
    from mim_workbench_napari._launch import open_workbench

    viewer = make_napari_viewer()
    widget = open_workbench(viewer)["Workbench"]
    image = viewer.layers["cxr0162"]
    region = viewer.layers["region: cxr0162"]
    assert region.data.shape == image.data.shape and region.data.max() == 1
    assert widget.image.value is image and widget.region.value is region

    widget.ratio.value = 0.5
    widget.show_preview.value = True
    preview = viewer.layers["masking preview: cxr0162"]
    masked = preview.data > 0.5
    assert 0.3 < masked.mean() < 0.7
    # region-guided: masked patches sit on the lungs first
    assert region.data[masked].mean() > region.data.mean()

    widget.save_region(tmp_path / "lungs.png")
    assert (tmp_path / "lungs.png").is_file()

    widget.create_region_layer()  # replaces the name? no: napari renames duplicates
    assert any(l.name.startswith("region: cxr0162") and l.data.max() == 0 for l in viewer.layers)


def test_painted_region_is_autosaved_and_restored(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from mim_workbench_napari._autosave import autosave_path
    from mim_workbench_napari._widget import WorkbenchWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.rand(80, 100).astype(np.float32), name="film")
    w = WorkbenchWidget(viewer)
    w.image.value = image
    w.create_region_layer()
    region = viewer.layers["region: film"]
    region.paint((40, 50), 1)  # a brush stroke, as the user paints
    qtbot.waitUntil(lambda: autosave_path("film").is_file(), timeout=5000)
    saved = np.load(autosave_path("film"))
    assert saved.sum() > 0 and np.array_equal(saved, region.data)

    # the viewer dies; a new session restores the painting
    viewer.layers.remove(region)
    w2 = WorkbenchWidget(viewer)
    w2.image.value = image
    w2.create_region_layer()
    assert np.array_equal(viewer.layers["region: film"].data, saved)


def test_auto_propose_lungs_then_edit(make_napari_viewer, sample_root):
    from mim_workbench.io import read_image, read_mask
    from mim_workbench.regions import dice
    from mim_workbench_napari._widget import WorkbenchWidget

    viewer = make_napari_viewer()
    img = read_image(sample_root / "images" / "cxr0174.png")
    layer = viewer.add_image(img.data, name="cxr0174")
    w = WorkbenchWidget(viewer)
    w.image.value = layer
    w.preset.value = "lungs"
    w.propose_region()
    region = viewer.layers["region: cxr0174"]
    truth = read_mask(sample_root / "masks" / "cxr0174.png", shape=img.data.shape)
    assert dice(region.data, truth) > 0.8
    assert region.mode == "paint" and w.region.value is region
    assert "proposed lungs" in w.status.value
