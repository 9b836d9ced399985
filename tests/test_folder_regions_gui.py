"""The Workbench dock proposes regions for a whole folder in the background (the same code as
``mim-workbench regions propose``), opens the flagged proposals for correction, and a
correction saved with no file chosen goes back into the folder's mask."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gui


def _records() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def test_folder_proposals_open_flagged_first_and_corrections_go_back(make_napari_viewer, qtbot, tmp_path,
                                                                    sample_root):
    from mim_workbench.io import read_mask
    from mim_workbench.regions.folder import propose_folder
    from mim_workbench_napari._widget import WorkbenchWidget

    data = tmp_path / "xrays"
    data.mkdir()
    for name in ("cxr0000.png", "cxr0058.png", "cxr0059.png"):
        shutil.copy(sample_root / "images" / name, data / name)
    out = tmp_path / "masks"
    # an earlier run of the folder, one of whose masks lost a lung: the run keeps it, and flags it
    list(propose_folder(data, out, preset="lungs"))
    mask = np.asarray(Image.open(out / "cxr0058.png")).copy()
    mask[:, mask.shape[1] // 2:] = 0
    Image.fromarray(mask).save(out / "cxr0058.png")

    viewer = make_napari_viewer()
    w = WorkbenchWidget(viewer)
    w.folder.value, w.folder_out.value = str(data), str(out)
    seen = len(_records())
    w.propose_folder()
    assert not w.folder_button.enabled
    qtbot.waitUntil(lambda: w.folder_worker is None, timeout=60_000)
    assert w.folder_button.enabled
    assert sorted(p.name for p in out.glob("*.png")) == ["contact_sheet.png", "cxr0000.png", "cxr0058.png",
                                                         "cxr0059.png"]
    assert "3 images: 1 flagged, 0 unreadable" in w.folder_status.value
    assert [layer.name for layer in viewer.layers] == ["cxr0058", "region: cxr0058"], "only the flagged one opens"
    assert any("Proposed 3 masks, 1 flagged" in m for m in _records()[seen:])

    region = viewer.layers["region: cxr0058"]
    assert region.data.shape == mask.shape and w.region.value is region
    assert np.array_equal(region.data > 0, mask > 0), "the folder's mask is what opens"
    corrected = np.zeros_like(region.data)
    corrected[40:-40, 30:-30] = 1
    region.data = corrected
    w.save_region(w.save_path.value)  # no file chosen: back to the folder's mask
    assert np.array_equal(read_mask(out / "cxr0058.png") > 0, corrected > 0)
