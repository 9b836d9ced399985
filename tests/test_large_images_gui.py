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
