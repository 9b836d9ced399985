"""The Workbench dock learns a region from the images painted in the viewer, in the
background: proposals appear on the other open images as editable region layers, the model
is saved and offered for one image and for a folder."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _records() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def test_paint_two_learn_and_the_third_gets_a_proposal(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench.io import read_image, read_mask
    from mim_workbench.regions import dice
    from mim_workbench_napari._learn_regions import LEARNED
    from mim_workbench_napari._widget import WorkbenchWidget

    viewer = make_napari_viewer()
    w = WorkbenchWidget(viewer)
    seen = len(_records())
    w.learn_from_painted()
    assert "Paint the region on at least one image first" in _records()[-1], "nothing painted yet"
    for name in ("cxr0000", "cxr0058", "cxr0126"):
        viewer.add_image(read_image(sample_root / "images" / f"{name}.png").data, name=name)
    for name in ("cxr0000", "cxr0058"):  # "painting": the sample's lung masks drawn into region layers
        w.image.value = viewer.layers[name]
        w.create_region_layer()
        layer = viewer.layers[f"region: {name}"]
        layer.data = read_mask(sample_root / "masks" / f"{name}.png", shape=layer.data.shape)
    assert [img.name for img, _ in w.painted_examples()] == ["cxr0000", "cxr0058"]

    w.learn_seconds.value = 15
    w.learn_out.value = str(tmp_path / "lungs.safetensors")
    w.learn_from_painted()
    assert not w.learn_button.enabled
    qtbot.waitUntil(lambda: w.learn_worker is None, timeout=120_000)
    assert w.learn_button.enabled and (tmp_path / "lungs.safetensors").is_file()
    assert "region: cxr0126" in viewer.layers
    proposal = viewer.layers["region: cxr0126"]
    assert proposal.mode == "paint" and proposal.data.any(), "an editable, non-empty proposal"
    truth = read_mask(sample_root / "masks" / "cxr0126.png", shape=proposal.data.shape)
    assert dice(proposal.data, truth) > dice(np.ones_like(truth), truth)
    assert any("Learned the region from 2 painted image(s); proposals on 1 other image(s)" in m
               for m in _records()[seen:])
    assert w.preset.value == LEARNED and LEARNED in w.preset.choices
    w.image.value = viewer.layers["cxr0126"]
    w.propose_region()  # the learned model proposes for one image too
    assert "proposed learned model" in w.status.value
