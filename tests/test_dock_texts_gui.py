"""What the docks say: what to do first on an empty viewer, long paths elided in the middle
with the whole path as tooltip, and notifications that name the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

LONG = "/data/hospital-export/2026/cohort-with-a-long-name/pretraining/runs/lungs-rgmim-vit-tiny/ckpt-800"


def _records() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def test_workbench_dock_says_what_to_do_first(make_napari_viewer):
    from mim_workbench_napari._widget import EMPTY_HINT, REGION_HINT, WorkbenchWidget

    viewer = make_napari_viewer()
    w = WorkbenchWidget(viewer)
    assert w.status.value == EMPTY_HINT and "File > Open" in EMPTY_HINT
    viewer.add_image(np.zeros((64, 64), np.float32), name="xray")
    assert w.status.value == REGION_HINT
    w.create_region_layer()
    assert w.status.value == ""


def test_every_dock_starts_with_a_first_step(make_napari_viewer):
    from mim_workbench_napari._finetune_widget import FinetuneWidget
    from mim_workbench_napari._inspect_widget import InspectWidget
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    assert "then Start" in PretrainWidget(viewer).status.value
    assert "then Reconstruct" in InspectWidget(viewer).metrics.value
    fine = FinetuneWidget(viewer)
    assert "then Start" in fine.status.value and "Predict on image" in fine.result.value


def test_long_paths_elide_in_the_middle_with_the_full_path_as_tooltip(make_napari_viewer, qtbot):
    from qtpy.QtWidgets import QLineEdit

    from mim_workbench_napari._inspect_widget import InspectWidget

    viewer = make_napari_viewer(show=True)
    w = InspectWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.checkpoint.value = LONG
    shown = [e for e in w.checkpoint.native.findChildren(QLineEdit) if not e.isHidden()]
    assert len(shown) == 1
    field = shown[0]
    assert field.toolTip() == LONG
    # what is painted (QLineEdit's own text), not the full value
    qtbot.waitUntil(lambda: "…" in QLineEdit.text(field))
    displayed = QLineEdit.text(field)
    assert "…" in displayed and displayed.startswith("/data") and displayed.endswith("ckpt-800")
    assert str(w.checkpoint.value) == LONG, "the value is the whole path"
    field.setText("/tmp/other/ckpt-4")
    field.editingFinished.emit()
    assert str(w.checkpoint.value) == "/tmp/other/ckpt-4" and field.toolTip() == "/tmp/other/ckpt-4"


def test_finished_pretraining_notification_names_the_checkpoint(make_napari_viewer):
    from mim_workbench.training.events import Finished
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    seen = len(_records())
    w.on_event(Finished(run_dir=LONG.rsplit("/", 1)[0], step=800, last_checkpoint=LONG))
    message = _records()[seen:][-1]
    assert message.startswith("Pretraining completed at step 800; checkpoint ckpt-800 in ")
    assert "lungs-rgmim-vit-tiny" in message and len(message) < 110
    assert str(w.resume_from.value) == LONG and LONG in w.status.value
