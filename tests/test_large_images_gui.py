"""A large mammogram opens in napari as a multiscale layer in millimetres (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

import _large_images as L

pytestmark = pytest.mark.gui


def test_mammogram_is_a_multiscale_layer_in_the_viewer(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    path = L.write_mammogram_dicom(tmp_path / "mammo.dcm")
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="mim-workbench")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale is True
    assert tuple(layer.scale) == pytest.approx(L.MAMMO_SPACING)
    assert tuple(layer.data[0].shape) == L.MAMMO_SHAPE and len(layer.data) >= 5
    assert layer.contrast_limits == [0.0, 65535.0]
    # a region painted at a low level lies on the image with that level's scale
    from mim_workbench.io.pyramid import open_pyramid
    from mim_workbench.regions.large import propose_region_large

    lm = propose_region_large(open_pyramid(path), "breast")
    labels = viewer.add_labels(lm.mask, scale=lm.scale, name="region: breast")
    ext_img, ext_lab = np.asarray(layer.extent.world), np.asarray(labels.extent.world)
    assert np.allclose(ext_img[1], ext_lab[1], rtol=0.01)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from _mim_tiny import tiny

    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain

    out = tmp_path_factory.mktemp("run")
    return pretrain(PretrainConfig.from_dict(tiny(out, max_steps=2))).last_checkpoint


def _phantom(shape: tuple[int, int]) -> np.ndarray:
    """float32 [0, 1]: a smooth disc with texture (a small stand-in for a mammogram)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    disc = (((yy - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((xx / (shape[1] * 0.9)) ** 2)) <= 1.0
    rng = np.random.default_rng(0)
    return np.clip(0.1 + 0.6 * disc + 0.05 * rng.standard_normal(shape, dtype=np.float32), 0, 1).astype(np.float32)


def test_inspect_streams_a_tiled_reconstruction_into_multiscale_layers(make_napari_viewer, qtbot, tmp_path,
                                                                       monkeypatch, tiny_checkpoint):
    """An in-memory image (no source file) above the (lowered) threshold goes tile by tile."""
    import mim_workbench_napari._inspect_widget as inspect
    import mim_workbench_napari._multiscale as multiscale

    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(multiscale, "TILED_THRESHOLD_PIXELS", 1_000_000)
    shape, scale = (2048, 1536), (0.07, 0.065)
    viewer = make_napari_viewer()
    layer = viewer.add_image(_phantom(shape), name="big", scale=scale, translate=(5.0, -3.0))
    w = inspect.InspectWidget(viewer)
    w.checkpoint.value = tiny_checkpoint
    w.image.value = layer
    w.ratio.value = 0.5
    seen_multiscale_mid_run: list[bool] = []

    def spy(item, img, _orig=w._show_band):
        _orig(item, img)
        band = item[0]
        if band.row1 < shape[0]:  # a band before the last: the layers exist and are multiscale already
            seen_multiscale_mid_run.append(viewer.layers["recon: big"].multiscale)

    w._show_band = spy  # (monkeypatch cannot undo attributes of a magicgui Container)
    w.reconstruct()
    assert not w.progress.native.isHidden()                                   # the dock shows progress
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)

    assert w.last_tiled is not None, w.metrics.value
    assert len(w.band_updates) > 2 and w.band_updates[0][1] < shape[0]       # intermediate bands were shown
    assert w.band_updates[-1][1] == shape[0] and w.band_updates[-1][2] == w.band_updates[-1][3]
    assert seen_multiscale_mid_run and all(seen_multiscale_mid_run)
    assert w.progress.value == 100 and "PSNR" in w.metrics.value
    for prefix in ("recon", "error"):
        out = viewer.layers[f"{prefix}: big"]
        assert out.multiscale and len(out.data) >= 3
        assert tuple(out.data[0].shape) == shape
        assert tuple(out.scale) == pytest.approx(scale) and tuple(out.translate) == pytest.approx((5.0, -3.0))
        full = np.asarray(out.data[0][...])
        assert np.isfinite(full).all() and np.abs(full).max() > 0
        coarse = np.asarray(out.data[-1][...])
        assert np.isfinite(coarse).all() and coarse.max() > 0                # coarser levels were refreshed too
    assert "masked: big" not in viewer.layers                                 # tiled runs show recon and error only


def test_workbench_dock_regions_preview_and_autosave_on_a_multiscale_image(make_napari_viewer, qtbot, monkeypatch):
    """Region layer, auto-propose, masking preview and autosave at a reduced level of a multiscale image."""
    from mim_workbench.io.pyramid import mean2x2
    import mim_workbench_napari._finetune_widget as ft
    from mim_workbench_napari._widget import REGION_MAX_SIDE, WorkbenchWidget

    levels = [L.mammogram_pixels((4096, 3072))]
    while max(levels[-1].shape) > 256:
        levels.append(np.rint(mean2x2(levels[-1])).astype(np.uint16))
    viewer = make_napari_viewer()
    img = viewer.add_image(levels, multiscale=True, name="mammo", scale=L.MAMMO_SPACING, translate=(2.0, 1.0),
                           contrast_limits=(0, 65535))
    w = WorkbenchWidget(viewer)
    w.image.value = img
    low_scale = (L.MAMMO_SPACING[0] * 4, L.MAMMO_SPACING[1] * 4)     # 4096 / 4 = 1024 = REGION_MAX_SIDE

    w.create_region_layer()
    region = viewer.layers["region: mammo"]
    assert region.data.shape == (1024, 768) and max(region.data.shape) <= REGION_MAX_SIDE
    assert tuple(region.scale) == pytest.approx(low_scale) and tuple(region.translate) == pytest.approx((2.0, 1.0))
    assert np.allclose(np.asarray(region.extent.world)[1], np.asarray(img.extent.world)[1], rtol=0.01)

    # painting is autosaved at that level and restored with it
    region.data[100:300, 50:250] = 1
    region.refresh()
    w.autosave()
    viewer.layers.remove(region)
    w.create_region_layer()
    restored = viewer.layers["region: mammo"]
    assert restored.data.shape == (1024, 768) and int(restored.data.sum()) == 200 * 200

    # auto-propose reads the reduced level through the pyramid and replaces the painted mask
    w.preset.value = "breast"
    w.propose_region()
    proposed = viewer.layers["region: mammo"]
    assert proposed.data.shape == (1024, 768) and tuple(proposed.scale) == pytest.approx(low_scale)
    frac = float(np.asarray(proposed.data).mean())
    assert 0.2 < frac < 0.9, frac
    assert "breast" in w.status.value

    # masking preview on the same grid, region-guided: the masked patches lie mostly in the breast
    w.strategy.value = "region"
    w.ratio.value = 0.3
    w.show_preview.value = True
    preview = viewer.layers["masking preview: mammo"]
    assert preview.data.shape == (1024, 768) and tuple(preview.scale) == pytest.approx(low_scale)
    masked = np.asarray(preview.data) > 0
    assert 0.15 < masked.mean() < 0.45
    assert (masked & (np.asarray(proposed.data) > 0)).sum() > 0.8 * masked.sum()

    # the Fine-tune dock's strokes layer also lives at a reduced level, aligned with the image
    monkeypatch.setattr(ft, "STROKES_MAX_SIDE", 2048)
    f = ft.FinetuneWidget(viewer)
    f.image.value = img
    f.create_strokes_layer()
    strokes = viewer.layers["strokes: mammo"]
    assert strokes.data.shape == (2048, 1536)
    assert tuple(strokes.scale) == pytest.approx((L.MAMMO_SPACING[0] * 2, L.MAMMO_SPACING[1] * 2))
    assert np.allclose(np.asarray(strokes.extent.world)[1], np.asarray(img.extent.world)[1], rtol=0.01)
    strokes.data[500:510, 300:600] = 1
    (item,) = f._staged([img])                        # staged with the level the strokes were painted on
    assert item.data.shape == item.strokes.shape == (2048, 1536)
