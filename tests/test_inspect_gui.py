"""Inspect dock: reconstruct an image layer from a checkpoint, side by side, with PSNR."""

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
    result = pretrain(PretrainConfig.from_dict(tiny(out, max_steps=4)))
    return result.last_checkpoint


def test_inspect_unseen_layer_side_by_side(make_napari_viewer, qtbot, tiny_checkpoint):
    from mim_workbench_napari._layers import viewer_grid
    from mim_workbench import sample
    from mim_workbench.io import read_image
    from mim_workbench_napari._inspect_widget import InspectWidget

    viewer = make_napari_viewer()
    # a DICOM radiograph: never part of the chest X-ray training set
    dicom = read_image(sample.dicom_files()[0])
    layer = viewer.add_image(dicom.data, name="unseen", scale=dicom.scale)
    w = InspectWidget(viewer)
    w.checkpoint.value = tiny_checkpoint
    w.image.value = layer
    w.ratio.value = 0.5
    w.reconstruct()
    qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)

    for prefix in ("masked", "recon", "recon+visible", "error"):
        out = viewer.layers[f"{prefix}: unseen"]
        assert out.data.shape == dicom.data.shape, prefix
        assert tuple(out.scale) == tuple(layer.scale)
    masked = viewer.layers["masked: unseen"].data
    assert np.isclose(masked, 0.5, atol=1e-3).mean() > 0.3  # masked patches shown mid-grey
    assert "PSNR" in w.metrics.value and "baseline" in w.metrics.value
    assert np.isfinite(w.last_result.metrics["psnr"])

    first = viewer.layers["masked: unseen"].data.copy()
    w._resample()
    qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)
    assert w.seed.value == 1
    assert not np.array_equal(first, viewer.layers["masked: unseen"].data), "a new mask was drawn"

    w.side_by_side.value = True
    assert viewer_grid(w.viewer).enabled


def test_inspect_bad_checkpoint_notifies(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from mim_workbench_napari._inspect_widget import InspectWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(64, 64).astype(np.float32), name="x")
    w = InspectWidget(viewer)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    w.checkpoint.value = tmp_path / "junk.safetensors"
    before = len(notification_manager.records)
    w.reconstruct()
    qtbot.waitUntil(lambda: w.worker is None, timeout=30_000)
    assert "failed" in w.metrics.value
    assert len(notification_manager.records) > before


def _explained(viewer, layer, checkpoint, qtbot):
    """An Inspect dock on ``layer`` with ``checkpoint``, after Explain finished: (dock, its explain panel)."""
    from mim_workbench_napari._inspect_widget import InspectWidget

    w = InspectWidget(viewer)
    w.checkpoint.value = checkpoint
    w.image.value = layer
    panel = w.explain_panel
    panel.explain()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60_000)
    return w, panel


def test_explain_adds_aligned_maps_and_similar_cases_sit_beside_the_image(make_napari_viewer, qtbot,
                                                                          tiny_checkpoint, sample_root, tmp_path,
                                                                          monkeypatch):
    from mim_workbench_napari._layers import viewer_grid
    from mim_workbench.io import read_image

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    viewer = make_napari_viewer()
    image = read_image(sample_root / "paediatric" / "images" / "km_n00001.png")
    layer = viewer.add_image(image.data, name="child", scale=(0.5, 0.5), translate=(10, 20))
    w, panel = _explained(viewer, layer, tiny_checkpoint, qtbot)
    for name in ("attention: child", "rollout: child", "features: child"):
        out = viewer.layers[name]
        assert out.data.shape[:2] == image.data.shape[:2], name
        assert tuple(out.scale) == tuple(layer.scale) and tuple(out.translate) == tuple(layer.translate)
    assert viewer.layers["features: child"].rgb and "rollout" in panel.status.value
    assert [l.name for l in w.image.choices] == ["child"], "the maps are not offered as images to inspect"

    panel.data.value = str(sample_root / "paediatric")
    panel.k.value = 3
    panel.find_similar()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=90_000)
    similar = [l.name for l in viewer.layers if l.name.startswith("similar ")]
    assert len(similar) == 3 and similar[0].startswith("similar 1: km_n00001 (d=0.000, Normal)"), similar
    assert viewer_grid(w.viewer).enabled and [h["distance"] for h in panel.neighbours] == sorted(h["distance"] for h in panel.neighbours)


@pytest.mark.parametrize("method", ["beit", "feature"])
def test_inspect_shows_token_maps_or_the_cosine_map(make_napari_viewer, qtbot, tmp_path, sample_root, method):
    from _mim_tiny import tiny

    from mim_workbench.io import read_image
    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain
    from mim_workbench_napari._inspect_widget import InspectWidget

    run = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", method=method, max_steps=2,
                                                 model_options={"codebook_size": 32}))).last_checkpoint
    viewer = make_napari_viewer()
    image = read_image(sample_root / "images" / "cxr0000.png")
    viewer.add_image(image.data, name="x")
    w = InspectWidget(viewer)
    w.checkpoint.value = run
    w.reconstruct()
    qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    names = {layer.name for layer in viewer.layers}
    if method == "beit":
        assert {"tokens: x", "predicted tokens: x", "recon: x"} <= names
        assert "masked-token accuracy" in w.metrics.value
    else:
        assert "similarity: x" in names and "recon: x" not in names
        assert "cosine of predicted and teacher features" in w.metrics.value
    assert viewer.layers["masked: x"].data.shape == image.data.shape


def test_a_multiscale_image_is_explained_tile_by_tile_at_its_own_scale(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                       sample_root, monkeypatch):
    from mim_workbench.inference import explain as explain_module
    from mim_workbench.io import read_image

    monkeypatch.setattr(explain_module, "MAX_MAP_SIDE", 200)
    monkeypatch.setattr(explain_module, "DEFAULT_TILE", 100)
    base = read_image(sample_root / "paediatric" / "images" / "km_n00001.png").data
    level0 = np.tile(base, (2, 2))                                   # 448 x 448
    viewer = make_napari_viewer()
    layer = viewer.add_image([level0, level0[::2, ::2]], multiscale=True, name="big", scale=(0.1, 0.1))
    _, panel = _explained(viewer, layer, tiny_checkpoint, qtbot)
    rollout = viewer.layers["rollout: big"]
    assert rollout.data.shape == (200, 200) and "(4 tiles)" in panel.status.value
    # level 1 (224 px) was explained and reduced to 200 px: each map pixel covers 448 / 200 level-0 pixels
    np.testing.assert_allclose(rollout.scale, [0.1 * 448 / 200] * 2, rtol=1e-6)
    assert rollout.data.shape[0] * rollout.scale[0] == pytest.approx(448 * 0.1)
