"""Bad files opened in the GUI: a notification naming the file, nothing added, the viewer intact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_corpus import load_corpus

pytestmark = pytest.mark.gui


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_bad_files_notify_and_leave_the_viewer_intact(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari.utils.notifications import notification_manager

    from mim_workbench_napari._inspect_widget import InspectWidget
    from mim_workbench_napari._reader import get_reader
    from mim_workbench_napari._widget import WorkbenchWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad"
    load_corpus().make_corpus(bad)
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.rand(64, 80).astype(np.float32), name="film")
    w = WorkbenchWidget(viewer)
    w.image.value = image
    w.create_region_layer()
    names_before = [layer.name for layer in viewer.layers]

    def messages_after(action) -> list[str]:
        before = len(notification_manager.records)
        action()
        return [str(n.message) for n in notification_manager.records[before:]]

    # Through the napari reader hook, as File > Open does.
    opened = ["zero_byte.png", "truncated.png", "truncated.dcm", "no_pixels.dcm", "unsupported_codec.dcm",
              "text.dcm", "stack3d.tif", "nan.tif", "inf.npy", "pickled.npy"]
    for name in opened:
        reader = get_reader(str(bad / name))
        assert reader is not None, name
        msgs = messages_after(lambda: reader(str(bad / name)))
        assert any(name in m for m in msgs), (name, msgs)
    # Region import of masks that do not fit the image.
    for name in ("mask_other_aspect.png", "mask_3d.npy", "mask_nan.npy", "text.png"):
        msgs = messages_after(lambda: w.import_region(bad / name))
        assert any(name in m for m in msgs), (name, msgs)
    # A trojan checkpoint in the Inspect dock: refused, its code never runs.
    marker = tmp_path / "PWNED"
    trojan = tmp_path / "trojan.pth"
    torch.save({"model": {"w": torch.zeros(2), "x": _Payload(marker)}}, trojan)
    inspect = InspectWidget(viewer)
    inspect.checkpoint.value = trojan
    before = len(notification_manager.records)
    inspect.reconstruct()
    qtbot.waitUntil(lambda: inspect.worker is None, timeout=30_000)
    assert len(notification_manager.records) > before and not marker.exists()

    # Nothing was added or lost; the viewer still works.
    assert [layer.name for layer in viewer.layers] == names_before
    assert viewer.layers["region: film"].data.shape == (64, 80)
    good = viewer.add_image(np.zeros((8, 8), np.float32), name="still works")
    assert good in viewer.layers
