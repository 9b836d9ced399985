"""The Fine-tune dock: labels from a dataset, from layer metadata or painted strokes;
training in a child process; probabilities, heat map and dense overlays."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _records():
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def _shown(widget) -> bool:
    return not widget.native.isHidden()


def _wait_trained(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)
    assert w.start.enabled, "the widget returns to ready"
    assert "finished" in w.status.value, w.status.value


def _add_sample(viewer, sample_root, stem):
    from mim_workbench.io import read_image

    loaded = read_image(sample_root / "images" / f"{stem}.png")
    return viewer.add_image(loaded.data, name=stem, metadata={"source": str(sample_root / "images" / f"{stem}.png")})


def test_classifier_from_dataset_then_probabilities_and_heatmap(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench_napari._finetune_widget import FROM_DATASET, TASK_CLASSIFY, FinetuneWidget
    from mim_workbench_napari._predict_panel import HEATMAP_PREFIX

    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.task.value = TASK_CLASSIFY
    w.labels_from.value = FROM_DATASET
    w.data.value = str(sample_root)
    w.out.value = str(tmp_path / "ft")
    w.epochs.value = 3
    w.device.value = "cpu"
    w.start_training()
    assert not w.start.enabled and w.stop.enabled
    _wait_trained(qtbot, w)
    assert len(w.plot.train[0]) >= 1, "the loss curve received steps"
    model = str(w.model.value)
    assert (tmp_path / "ft") in __import__("pathlib").Path(model).parents, model

    img = _add_sample(viewer, sample_root, "cxr0124")
    w.image.value = img
    w.predict()
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=60_000)
    heat = viewer.layers[HEATMAP_PREFIX + "cxr0124"]
    assert heat.data.shape == img.data.shape
    assert 0.0 <= float(heat.data.min()) and float(heat.data.max()) <= 1.0
    assert heat.data.std() > 0, "the heat map varies over the image"
    probs = heat.metadata["probs"]
    assert set(probs) == {"COVID-19", "Other pneumonia"}
    assert abs(sum(probs.values()) - 1.0) < 1e-4
    assert heat.metadata["label"] in w.result.value
    overlay = w.text_overlay()
    assert overlay.visible and "cxr0124" in overlay.text
    # styling applies live
    w.opacity.value = 0.3
    w.colormap.value = "viridis"
    assert heat.opacity == pytest.approx(0.3) and heat.colormap.name == "viridis"

    # a second training run in the same folder goes to a fresh folder, never over the first
    w.start_training()
    assert str(w.out.value).endswith("ft-2")
    _wait_trained(qtbot, w)


def test_a_stopped_classifier_run_resumes_from_the_dock(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench.training import events as ev
    from mim_workbench.training.finetune import FinetuneConfig, finetune
    from mim_workbench.training.finetune_state import STATE_FILE
    from mim_workbench_napari._finetune_widget import TASK_CLASSIFY, TASK_DENSE, FinetuneWidget

    run = tmp_path / "ft"
    first = finetune(FinetuneConfig.from_dict(dict(data=str(sample_root), out=str(run), checkpoint="scratch", mode="probe",
                                    epochs=4, max_steps=2, batch_size=4, threads=1, device="cpu", img_size=64,
                                    embed_dim=64, depth=2, num_heads=2)))
    assert first.reason == "max_steps" and (run / STATE_FILE).is_file()
    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.device.value = "cpu"
    w.out.value = str(tmp_path / "elsewhere")
    assert not _shown(w.resume_run), "nothing to resume in a fresh folder"
    w.out.value = str(run)
    assert _shown(w.resume_run)
    w.task.value = TASK_DENSE
    assert not _shown(w.resume_run), "dense runs have no resume"
    w.task.value = TASK_CLASSIFY
    w.resume_training()
    assert not w.start.enabled and not w.resume_run.enabled and w.stop.enabled
    _wait_trained(qtbot, w)
    assert "completed" in w.status.value and str(w.out.value) == str(run), "it went on in the same folder"
    assert not (run / STATE_FILE).exists() and not _shown(w.resume_run)
    assert any("resumed at epoch" in line for line in (run / "metrics.json").read_text().splitlines())
    w.on_event(ev.Finished(run_dir=str(run), step=3, last_checkpoint=None, reason="stopped"))
    assert "Resume stopped run continues it" in w.status.value


def test_classifier_from_layer_metadata(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench_napari._finetune_widget import FROM_LAYERS, FinetuneWidget

    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    w.labels_from.value = FROM_LAYERS
    assert _shown(w.label_text) and not _shown(w.data)
    labels = {"cxr0000": "other", "cxr0058": "other", "cxr0059": "other",
              "cxr0124": "covid", "cxr0126": "covid", "cxr0155": "covid", "cxr0162": "covid"}
    for stem, lab in labels.items():
        layer = _add_sample(viewer, sample_root, stem)
        if stem == "cxr0059":
            layer.metadata.pop("source")  # an in-memory layer: staged as .npy
        w.image.value = layer
        w.label_text.value = lab
        w.set_label.native.click()
        assert layer.metadata["label"] == lab
    assert "covid ×4" in w.status.value and "other ×3" in w.status.value
    w.out.value = str(tmp_path / "ft")
    w.epochs.value = 2
    w.device.value = "cpu"
    w.start_training()
    _wait_trained(qtbot, w)
    manifest = (tmp_path / "ft" / "inputs" / "labels.csv").read_text().splitlines()
    assert manifest[0] == "id,image,label" and len(manifest) == 1 + len(labels)
    assert (tmp_path / "ft" / "inputs" / "cxr0059.npy").is_file()
    assert any(line.endswith("cxr0124.png,covid") for line in manifest)


def test_dense_from_painted_strokes_overlays_labels(make_napari_viewer, qtbot, tmp_path, sample_root):
    from mim_workbench.io import read_mask
    from mim_workbench_napari._finetune_widget import STROKES_PREFIX, TASK_DENSE, FinetuneWidget
    from mim_workbench_napari._predict_panel import DENSE_PREFIX, HEATMAP_PREFIX

    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    w.task.value = TASK_DENSE
    assert _shown(w.classes) and _shown(w.steps) and not _shown(w.epochs)
    img = _add_sample(viewer, sample_root, "cxr0000")
    w.image.value = img
    w.create_strokes_layer()
    strokes = viewer.layers[STROKES_PREFIX + "cxr0000"]
    assert strokes.data.shape == img.data.shape and strokes.mode == "paint"
    # "paint" a few thin strokes: class 1 inside the lungs, class 2 outside
    lungs = read_mask(sample_root / "masks" / "cxr0000.png", shape=img.data.shape).astype(bool)
    rng = np.random.default_rng(0)
    painted = np.zeros(img.data.shape, np.uint8)
    for cls, where in ((1, lungs), (2, ~lungs)):
        rr, cc = np.nonzero(where)
        pick = rng.choice(len(rr), 400, replace=False)
        painted[rr[pick], cc[pick]] = cls
    strokes.data = painted
    w.classes.value = "lung, other"
    w.steps.value = 25
    w.out.value = str(tmp_path / "dense")
    w.device.value = "cpu"
    w.start_training()
    _wait_trained(qtbot, w)
    staged = np.load(tmp_path / "dense" / "inputs" / "cxr0000_strokes.npy")
    assert np.array_equal(staged, painted), "painted strokes are kept in the run folder"

    w.predict()
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=60_000)
    dense = viewer.layers[DENSE_PREFIX + "cxr0000"]
    assert dense.data.shape == img.data.shape
    assert set(np.unique(dense.data)) <= {1, 2} and dense.metadata["classes"] == ["lung", "other"]
    heat = viewer.layers[HEATMAP_PREFIX + "cxr0000"]
    # the head learned something: p(lung) is higher inside the lungs than outside
    assert heat.data[lungs].mean() > heat.data[~lungs].mean()
    assert "lung" in w.result.value


def test_bad_inputs_notify_and_keep_ready(make_napari_viewer, qtbot, tmp_path):
    from mim_workbench_napari._finetune_widget import FROM_LAYERS, TASK_DENSE, FinetuneWidget

    seen = len(_records())  # napari keeps every notification of the session
    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    viewer.add_image(np.random.default_rng(0).random((64, 64), dtype=np.float32), name="lonely")
    w.labels_from.value = FROM_LAYERS
    w.out.value = str(tmp_path / "ft")
    w.start_training()
    assert w.start.enabled and w.worker is None
    assert any("at least two classes" in m for m in _records()[seen:])

    w.task.value = TASK_DENSE
    w.start_training()
    assert any("no painted strokes" in m for m in _records()[seen:])

    w.model.value = str(tmp_path / "no-such-model")
    w.image.value = viewer.layers["lonely"]
    w.predict()
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=30_000)
    assert any("Prediction failed" in m and "no-such-model" in m for m in _records()[seen:])
    assert w.predict_button.enabled


def test_large_image_prediction_streams_a_multiscale_heatmap(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                             sample_root):
    from _mim_tiny import tiny_classifier

    import mim_workbench_napari._multiscale as multiscale
    from mim_workbench_napari._finetune_widget import HEATMAP_PREFIX, FinetuneWidget

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(multiscale, "TILED_THRESHOLD_PIXELS", 500_000)
    checkpoint = tiny_classifier(tmp_path / "clf", sample_root)
    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    rng = np.random.default_rng(0)
    big = np.clip(0.4 + 0.1 * rng.standard_normal((1200, 900)), 0, 1).astype(np.float32)
    img = viewer.add_image(big, name="big", scale=(0.1, 0.1), translate=(2.0, 3.0))
    w.image.value = img
    w.model.value = checkpoint
    w.predict()
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=120_000)
    assert len(w.band_updates) >= 2 and w.band_updates[0][1] < big.shape[0], "the map filled in band by band"
    heat = viewer.layers[HEATMAP_PREFIX + "big"]
    assert heat.multiscale and tuple(heat.data[0].shape) == big.shape
    assert tuple(heat.scale) == pytest.approx((0.1, 0.1)) and tuple(heat.translate) == pytest.approx((2.0, 3.0))
    full = np.asarray(heat.data[0][...])
    assert np.isfinite(full).all() and full.std() > 0
    assert set(heat.metadata["probs"]) == {"COVID-19", "Other pneumonia"}
    assert heat.metadata["label"] in w.result.value and "tiles" in w.result.value


def test_large_image_dense_prediction_streams_multiscale_labels(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import mim_workbench_napari._multiscale as multiscale
    from mim_workbench.models import ModelConfig
    from mim_workbench.training.dense import train_dense
    from mim_workbench_napari._finetune_widget import FinetuneWidget
    from mim_workbench_napari._predict_panel import DENSE_PREFIX, HEATMAP_PREFIX
    from napari.layers import Labels

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(multiscale, "TILED_THRESHOLD_PIXELS", 500_000)
    rng = np.random.default_rng(0)
    small = np.clip(0.3 + 0.1 * rng.standard_normal((128, 128)), 0, 1).astype(np.float32)
    small[:, 64:] += 0.4                                        # a bright right half: class 1
    strokes = np.zeros((128, 128), np.uint8)
    strokes[20:110:6, 70:120] = 1
    strokes[20:110:6, 8:58] = 2
    head = train_dense([small], [strokes], model_config=ModelConfig.from_dict(dict(img_size=(64, 64), patch_size=8, embed_dim=32,
                                                                   depth=1, num_heads=2)),
                       classes=["bright", "dark"], steps=10, batch_size=4, crop=48, out=tmp_path / "dense")
    viewer = make_napari_viewer()
    w = FinetuneWidget(viewer)
    big = np.clip(0.3 + 0.1 * rng.standard_normal((1200, 900)), 0, 1).astype(np.float32)
    big[:, 450:] += 0.4
    img = viewer.add_image(big, name="big", scale=(0.1, 0.1), translate=(2.0, 3.0))
    w.image.value = img
    w.model.value = str(head.checkpoint)
    w.predict()
    qtbot.waitUntil(lambda: w.predict_worker is None, timeout=120_000)
    labels = viewer.layers[DENSE_PREFIX + "big"]
    heat = viewer.layers[HEATMAP_PREFIX + "big"]
    assert isinstance(labels, Labels) and labels.multiscale and tuple(labels.data[0].shape) == big.shape
    assert tuple(labels.scale) == pytest.approx((0.1, 0.1)) and tuple(labels.translate) == pytest.approx((2.0, 3.0))
    assert labels.metadata["classes"] == ["bright", "dark"]
    full = np.asarray(labels.data[0][...])
    assert set(np.unique(full)) <= {1, 2} and full.all(), "every pixel got a class"
    p_bright = np.asarray(heat.data[0][...])
    np.testing.assert_array_equal(full == 1, p_bright > 1 - p_bright)   # the labels are the maps' argmax
    coarse = np.asarray(labels.data[-1][...])
    assert coarse.shape == tuple(heat.data[-1].shape) and set(np.unique(coarse)) <= {1, 2}
