"""The Pretrain dock trains in a child process and feeds the viewer without blocking it."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _mim_tiny import fill_pretrain_dock

pytestmark = pytest.mark.gui


def test_pretrain_dock_runs_previews_and_checkpoints(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench_napari._layers import viewer_grid
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((256, 128), np.float32), name="an open image")
    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    fill_pretrain_dock(w, sample_root, tmp_path / "run", epochs=2)

    w.start_training()
    assert not w.start.enabled and w.stop.enabled
    # the Qt event loop keeps turning while the child process trains
    ticks = []
    timer_start = time.monotonic()
    qtbot.waitUntil(lambda: (ticks.append(time.monotonic()) or True) and w.worker is None, timeout=50_000)
    assert w.start.enabled, "the widget returns to ready"
    assert "finished" in w.status.value, w.status.value
    assert w.checkpoints.choices, "checkpoints are listed"
    for prefix in ("masked", "recon", "error"):
        assert f"{prefix}: {sample_root.name}" in viewer.layers
    assert viewer_grid(viewer).enabled   # the previews side by side, not stacked,
    recon = viewer.layers[f"recon: {sample_root.name}"]   # each as large as the open image (64 px -> 256)
    assert tuple(recon.scale) == pytest.approx((4.0, 4.0))
    assert len(w.plot.train[0]) >= 2
    assert time.monotonic() - timer_start < 50


@pytest.mark.parametrize("method", ["beit", "feature"])
def test_pretrain_dock_runs_the_token_and_feature_methods_with_their_previews(make_napari_viewer, qtbot, tmp_path,
                                                                             sample_root, method):
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.method.value = method
    assert w.ratio.value == pytest.approx(0.4 if method == "beit" else 0.6), "the method's own mask ratio"
    fill_pretrain_dock(w, sample_root, tmp_path / "run", epochs=1)
    w.img_size.value = 128          # 64 patches an image: enough for BEiT's 512 tokens on 11 images
    w.start_training()
    qtbot.waitUntil(lambda: w.worker is None, timeout=90_000)
    assert "finished" in w.status.value, w.status.value
    name = sample_root.name
    own = ("tokens", "predicted tokens") if method == "beit" else ("similarity",)
    for prefix in ("masked", *own):
        assert f"{prefix}: {name}" in viewer.layers
    assert (f"recon: {name}" in viewer.layers) == (method == "beit"), "latent targets have no pixels to show"
    column = "token_acc" if method == "beit" else "target_std"
    assert column in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def test_pretrain_dock_reports_bad_settings(make_napari_viewer, qtbot, tmp_path):
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    w.data.value = str(tmp_path / "does-not-exist")
    w.out.value = str(tmp_path / "run")
    w.start_training()
    qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)
    assert w.start.enabled and "failed" in w.status.value


def test_pretrain_dock_preset_fills_fields_and_config(make_napari_viewer, tmp_path):
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    w.out.value = str(tmp_path / "run")
    # the default preset: BEiT with what the preset leaves to it (its masking, ratio and rate)
    assert (w.preset.value, w.method.value, w.strategy.value, w.ratio.value, w.blr.value, w.img_size.value) == \
        ("cpu", "beit", "blockwise", 0.4, 2e-3, 112)
    assert w.config_dict()["time_budget_s"] == 1200.0
    assert w.regions.native.isHidden()   # where region masks come from matters to region masking only
    w.preset.value = "quick-cpu"
    assert (w.method.value, w.strategy.value, w.img_size.value, w.batch.value) == ("simmim", "region", 64, 8)
    assert not w.regions.native.isHidden()
    cfg = w.config_dict()
    encoder = cfg["encoder"]
    assert (encoder["patch_size"], encoder["embed_dim"], encoder["depth"], cfg["lr"]) == (4, 64, 2, 3e-3)
    w.epochs.value = 7  # a field changed after choosing the preset wins
    assert w.config_dict()["epochs"] == 7
    w.preset.value = "rgmim-paper"
    assert w.model.value == "vit_base_patch16_224" and w.config_dict()["decoder_embed_dim"] == 512


def test_closing_the_viewer_stops_training_and_keeps_a_checkpoint(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench.models.checkpoint import list_checkpoints
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w)
    fill_pretrain_dock(w, sample_root, tmp_path / "run", epochs=500)  # far more than the test waits for
    w.start_training()
    qtbot.waitUntil(lambda: w.progress.value >= 3, timeout=60_000)
    run = w.run
    viewer.close()
    assert not run._proc.is_alive(), "the training process ended with the viewer"
    assert list_checkpoints(tmp_path / "run"), "the last state was checkpointed on close"


def test_loss_curve_is_thinned_to_the_plot_width():
    from mim_workbench_napari._training_widgets import decimate

    xs = list(range(10_000))
    ys = [1.0 / (1 + x) for x in xs]
    tx, ty = decimate(xs, ys, 300)
    assert len(tx) == len(ty) == 300
    assert tx[0] < 20 and tx[-1] > 9_970 and all(a < b for a, b in zip(tx, tx[1:]))
    assert abs(sum(ty) / 300 - sum(ys) / len(ys)) < 1e-3  # bins of equal size keep the mean
    assert decimate(xs[:50], ys[:50], 300) == (xs[:50], ys[:50])


def _preview(step: int, value: float, size: int = 8):
    import numpy as np

    from mim_workbench.training.events import Preview

    a = np.full((size, size), value, dtype=np.float32)
    return Preview(step=step, image=a, masked=a.copy(), reconstruction=a.copy(), error=a * 0.5)


def test_previews_update_the_same_layers_in_place(make_napari_viewer):
    import numpy as np

    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    w.preview_interval_s = 0.0          # every preview at once (pacing: the next test)
    w.on_event(_preview(0, 0.2))
    layers = {p: viewer.layers[f"{p}: preview"] for p in ("masked", "recon", "error")}
    w.on_event(_preview(25, 0.8))
    assert [viewer.layers[f"{p}: preview"] for p in layers] == list(layers.values()), "no new layers"
    assert len(viewer.layers) == 3
    np.testing.assert_allclose(layers["recon"].data, 0.8)
    np.testing.assert_allclose(layers["error"].data, 0.4)
    assert layers["error"].contrast_limits == pytest.approx([0.0, 0.4]), "the error map stays visible as it shrinks"
    # napari was told: the layer list's thumbnail shows the new values, not the first ones
    thumb = layers["recon"].thumbnail
    assert abs(int(thumb[thumb.shape[0] // 2, thumb.shape[1] // 2, 0]) - round(0.8 * 255)) <= 2
    w.on_event(_preview(50, 0.3, size=12))  # a new shape replaces the data
    assert layers["masked"].data.shape == (12, 12)
    np.testing.assert_allclose(layers["masked"].data, 0.3)


def test_previews_are_paced_and_the_newest_wins(make_napari_viewer, qtbot):
    """One preview per interval at most; those in between are replaced by the newest, which is
    shown when the interval has passed, and the run's last one is shown when it finishes."""
    import numpy as np

    from mim_workbench.training.events import Finished
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    w.preview_interval_s = 0.5
    w.on_event(_preview(0, 0.2))                       # the first: at once
    recon = viewer.layers["recon: preview"]
    w.on_event(_preview(25, 0.5))
    w.on_event(_preview(50, 0.7))
    np.testing.assert_allclose(recon.data, 0.2)        # held back
    qtbot.waitUntil(lambda: float(recon.data.mean()) == pytest.approx(0.7), timeout=3000)   # the newest, once
    w.preview_interval_s = 60.0
    w.on_event(_preview(75, 0.9))
    np.testing.assert_allclose(recon.data, 0.7)
    w.on_event(Finished(run_dir="r", step=80, last_checkpoint=None, reason="completed"))
    np.testing.assert_allclose(recon.data, 0.9)        # the last picture is not lost


def test_progress_reaches_the_dock_in_one_held_repaint(make_napari_viewer):
    from mim_workbench.training.events import Progress
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = make_napari_viewer()
    w = PretrainWidget(viewer)
    w.progress.max = 100
    event = Progress(step=40, total=100, epoch=0, loss=0.5, lr=1e-3, images_per_s=3.0, eta_s=20.0)
    w.on_event(event)
    assert w.progress.value == 0, "shown at the next progress interval, not at every step"
    w._flush_progress()
    assert w.progress.value == 40 and "step 40/100" in w.status.value
    assert w.native.updatesEnabled(), "updates are held only while the widgets change"


def test_a_skipped_unreadable_image_is_a_warning(make_napari_viewer):
    from napari.utils.notifications import NotificationSeverity, notification_manager

    from mim_workbench.training.events import Progress
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    w = PretrainWidget(make_napari_viewer())
    seen = len(notification_manager.records)
    w.on_event(Progress(step=3, total=10, epoch=0, loss=0.5, lr=1e-3, images_per_s=3.0, eta_s=2.0,
                        unreadable=("/data/b.dcm: image header but no pixel data",)))
    (note,) = notification_manager.records[seen:]
    assert note.severity == NotificationSeverity.WARNING and "b.dcm" in str(note.message)
    assert "training goes on" in str(note.message)


def test_a_long_status_line_wraps_instead_of_shrinking_the_canvas(make_napari_viewer, qtbot):
    from mim_workbench_napari._launch import open_workbench

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    w = open_workbench(viewer)["Pretrain"]
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.wait(200)
    before = canvas.width()
    w.status.value = "step 123456/1000000  loss 0.987654  123.4 img/s  ETA 12:34:56 " * 3
    qtbot.wait(200)
    assert canvas.width() == before, "the dock did not widen"
    assert w.status.native.heightForWidth(w.status.native.width()) > w.status.native.fontMetrics().height(), \
        "the line wraps"
