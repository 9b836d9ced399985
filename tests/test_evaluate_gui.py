"""The Evaluate dock drives a small study in the background and shows its answer: the
verdict, the AUC table (the numbers of summary.json) and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _mim_tiny import TINY_MODEL

pytestmark = pytest.mark.gui


def test_a_study_on_the_sample_data_is_shown_in_the_dock(make_napari_viewer, qtbot, tmp_path):
    from mim_workbench.sample import paediatric_root
    from mim_workbench.study.job import TASK
    from mim_workbench_napari._evaluate_widget import EvaluateWidget

    viewer = make_napari_viewer()
    w = EvaluateWidget(viewer)
    assert Path(str(w.data.value)) == paediatric_root() and not w.regions.native.isHidden()
    w.variants.value = ["scratch", "mae"]
    assert w.regions.native.isHidden(), "region sources only matter for rgmim"
    w.fractions.value = "0.5, 1"
    w.seeds.value = 2
    w.minutes.value = 0.1
    w.out.value = str(tmp_path / "study")
    config = w.config_dict()
    assert config["unlabeled"] == config["data"] == str(paediatric_root()) and config["budget_minutes"] == 0.1
    # the dock's study with a tiny encoder, so that the test takes seconds
    config.update(pretrain={**TINY_MODEL, "batch_size": 8}, finetune={"epochs": 5, "batch_size": 8}, threads=1,
                  bootstrap=200)
    w._launch(TASK, config)
    assert not w.start.enabled and w.stop.enabled
    qtbot.waitUntil(lambda: w.job.worker is None, timeout=240_000)
    assert w.start.enabled and w.result is not None, w.status.value
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert w.verdict.value == summary["verdict"] and "MAE pretraining changed AUC" in w.verdict.value
    for row in summary["table"]:
        assert f"{row['fraction'] * 100:g} %: {row['auc_mean']:.3f}" in w.table.value
    assert w.plot.canvas.pixmap() is not None and not w.plot.canvas.pixmap().isNull()


def test_wrong_settings_are_said_before_anything_starts(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    from mim_workbench_napari._evaluate_widget import EvaluateWidget

    w = EvaluateWidget(make_napari_viewer())
    w.fractions.value = "0.1, half"
    w.start_study()
    assert "label fractions '0.1, half'" in str(notification_manager.records[-1].message)
    assert w.job.worker is None and w.start.enabled
