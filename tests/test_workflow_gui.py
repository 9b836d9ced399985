"""The whole workbench flow in one viewer, as a user drives it (under Xvfb):

load sample → auto-propose + paint a region → masking preview → start a tiny
pretraining → previews arrive → pause → continue → stop → resume from the
checkpoint → inspect an unseen image → fine-tune a dense head from strokes →
overlay its predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
from _mim_tiny import fill_pretrain_dock

pytestmark = pytest.mark.gui


def _records() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def _paint_points(layer, mask: np.ndarray, label: int, n: int, seed: int) -> None:
    """Brush strokes where ``mask`` holds, the way the paint tool writes them."""
    rr, cc = np.nonzero(mask)
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(rr), n, replace=False):
        layer.paint((int(rr[i]), int(cc[i])), label)


def test_whole_flow(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench_napari._layers import viewer_grid
    from mim_workbench import sample
    from mim_workbench.io import read_image, read_mask
    from mim_workbench.regions import dice
    from mim_workbench_napari._finetune_widget import STROKES_PREFIX, TASK_DENSE
    from mim_workbench_napari._predict_panel import DENSE_PREFIX, HEATMAP_PREFIX
    from mim_workbench_napari._launch import open_workbench

    seen = len(_records())  # notifications of earlier tests stay in napari's global record
    viewer = make_napari_viewer()
    docks = open_workbench(viewer)
    bench, pre, insp, ft = docks["Workbench"], docks["Pretrain"], docks["Inspect"], docks["Fine-tune"]
    image = viewer.layers["cxr0162"]
    assert bench.image.value is image

    # -- regions: auto-propose the lungs, then paint a correction ------------------------------
    bench.preset.value = "lungs"
    bench.propose_region()
    region = viewer.layers["region: cxr0162"]
    proposed = region.data.copy()
    truth = read_mask(sample_root / "masks" / "cxr0162.png", shape=image.data.shape)
    assert dice(proposed, truth) > 0.8 and region.mode == "paint"
    outside = np.argwhere(proposed == 0)[len(np.argwhere(proposed == 0)) // 2]
    region.brush_size = 9
    region.paint(tuple(int(v) for v in outside), 1)
    assert region.data.sum() > proposed.sum() and region.data[tuple(outside)] == 1

    # -- masking preview follows the region and the ratio ------------------------------------
    bench.strategy.value = "region"
    bench.ratio.value = 0.5
    bench.show_preview.value = True
    preview = viewer.layers["masking preview: cxr0162"]
    masked = preview.data > 0.5
    assert region.data[masked].mean() > region.data.mean()
    share = masked.mean()
    bench.ratio.value = 0.25
    assert (viewer.layers["masking preview: cxr0162"].data > 0.5).mean() < share

    # -- pretraining in the background: previews, pause, continue, stop ------------------------
    fill_pretrain_dock(pre, sample_root, tmp_path / "pretrain", epochs=40)
    pre.start_training()
    events: list = []
    pre.worker.yielded.connect(events.append)
    name = sample_root.name
    qtbot.waitUntil(lambda: f"recon: {name}" in viewer.layers, timeout=90_000)
    for prefix in ("masked", "recon", "error"):
        layer = viewer.layers[f"{prefix}: {name}"]
        assert layer.data.ndim >= 2 and np.isfinite(layer.data).all() and layer.data.std() > 0, prefix

    pre.toggle_pause()
    assert pre.pause.text == "Continue" and pre.status.value == "paused"
    def steps() -> int:
        return sum(type(e).__name__ == "Progress" for e in events)

    qtbot.wait(1500)  # the loop finishes the step it is in, then waits
    held = steps()
    qtbot.wait(1500)
    assert steps() == held, "no steps while paused"
    pre.toggle_pause()
    qtbot.waitUntil(lambda: steps() > held, timeout=30_000)
    pre.stop_training()
    qtbot.waitUntil(lambda: pre.worker is None, timeout=60_000)
    finished = [e for e in events if type(e).__name__ == "Finished"]
    assert finished and finished[-1].reason == "stopped", events[-3:]
    stopped_at = finished[-1].step
    assert pre.checkpoints.choices and str(pre.resume_from.value) == finished[-1].last_checkpoint

    # -- resume from that checkpoint: the run continues where it stopped ----------------------
    events.clear()
    pre.start_training()
    pre.worker.yielded.connect(events.append)
    qtbot.waitUntil(lambda: pre.worker is None, timeout=120_000)
    started = [e for e in events if type(e).__name__ == "Started"]
    done = [e for e in events if type(e).__name__ == "Finished"]
    assert started and started[0].start_step == stopped_at
    assert done and done[-1].reason == "completed" and done[-1].step > stopped_at
    checkpoint = done[-1].last_checkpoint

    # -- inspect an image never trained on --------------------------------------------------
    unseen = read_image(sample.dicom_files()[0])
    layer = viewer.add_image(unseen.data, name="unseen", scale=unseen.scale)
    insp.checkpoint.value = checkpoint
    insp.image.value = layer
    insp.reconstruct()
    qtbot.waitUntil(lambda: insp.worker is None, timeout=60_000)
    for prefix in ("masked", "recon", "recon+visible", "error"):
        assert viewer.layers[f"{prefix}: unseen"].data.shape == unseen.data.shape
    assert "PSNR" in insp.metrics.value
    insp.side_by_side.value = True
    assert viewer_grid(insp.viewer).enabled
    insp.side_by_side.value = False

    # -- fine-tune a dense head from a few strokes, on the pretrained encoder ------------------
    ft.task.value = TASK_DENSE
    ft.image.value = image
    ft.create_strokes_layer()
    strokes = viewer.layers[STROKES_PREFIX + "cxr0162"]
    strokes.brush_size = 3
    lungs = proposed.astype(bool)
    _paint_points(strokes, lungs, 1, 25, seed=0)
    _paint_points(strokes, ~lungs, 2, 25, seed=1)
    assert set(np.unique(strokes.data)) == {0, 1, 2}
    ft.classes.value = "lung, other"
    ft.encoder.value = checkpoint
    ft.steps.value = 30
    ft.out.value = str(tmp_path / "dense")
    ft.device.value = "cpu"
    ft.start_training()
    qtbot.waitUntil(lambda: ft.worker is None, timeout=120_000)
    assert "finished" in ft.status.value, (ft.status.value, _records()[seen:])

    # -- overlay its predictions ---------------------------------------------------------------
    ft.predict()
    qtbot.waitUntil(lambda: ft.predict_worker is None, timeout=60_000)
    dense = viewer.layers[DENSE_PREFIX + "cxr0162"]
    heat = viewer.layers[HEATMAP_PREFIX + "cxr0162"]
    assert dense.data.shape == heat.data.shape == image.data.shape
    assert tuple(heat.scale) == tuple(image.scale)
    assert heat.data[lungs].mean() > heat.data[~lungs].mean(), "p(lung) is higher inside the lungs"
    assert not any("failed" in m.lower() for m in _records()[seen:])
