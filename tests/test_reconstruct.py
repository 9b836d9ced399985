"""reconstruct(): pictures at the letterboxed size, masks, metrics only on masked content pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE_IMAGES, SAMPLE_MASKS

from mim_workbench.errors import ConfigError
from mim_workbench.inference.reconstruct import masked_metrics, psnr, reconstruct
from mim_workbench.models import ModelConfig, build_model
from mim_workbench.models.checkpoint import save_checkpoint

IMAGE = SAMPLE_IMAGES / "cxr0058.png"
MASK = SAMPLE_MASKS / "cxr0058.png"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(img_size=(64, 64), embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                      decoder_depth=1, decoder_num_heads=2))
    return build_model(cfg).eval()


def test_pictures_masks_and_metrics(model):
    r = reconstruct(model, IMAGE, seed=1)
    for a in (r.image, r.masked, r.reconstruction, r.recon_plus_visible, r.error):
        assert a.shape == (64, 64) and a.dtype == np.float32
    assert r.mask.dtype == bool and r.mask.mean() == pytest.approx(0.75)
    m = r.metrics
    assert m["strategy"] == "random" and m["ratio"] == 0.75 and m["n_pixels"] == int((r.mask & r.content).sum())
    assert m["mse"] > 0 and m["psnr"] == pytest.approx(10 * math.log10(1 / m["mse"]))
    # Visible pixels are the input, error lives only on masked pixels.
    assert np.allclose(r.recon_plus_visible[~r.mask], r.image[~r.mask])
    assert (r.error[~r.mask] == 0).all() and (r.error[r.mask] > 0).any()
    # The baseline is the visible-mean fill, computed here independently.
    sel = r.mask & r.content
    fill = r.image[~r.mask & r.content].mean()
    assert m["mse_baseline"] == pytest.approx(float(np.mean((fill - r.image[sel]) ** 2)), rel=1e-5)
    assert m["mse"] == pytest.approx(float(np.mean((r.recon_plus_visible[sel] - r.image[sel]) ** 2)), rel=1e-5)


def test_seed_makes_it_reproducible(model):
    a = reconstruct(model, IMAGE, seed=3)
    b = reconstruct(model, IMAGE, seed=3)
    c = reconstruct(model, IMAGE, seed=4)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.reconstruction, b.reconstruction)
    assert not np.array_equal(a.mask, c.mask)


def test_padding_is_excluded_from_metrics(model):
    wide = np.random.default_rng(0).random((40, 80)).astype(np.float32)   # letterboxed into 32x64 content
    r = reconstruct(model, wide, ratio=0.5)
    assert r.letterbox.content_shape == (32, 64)
    assert r.content[:32].all() and not r.content[32:].any()
    assert r.metrics["n_pixels"] == int((r.mask[:32]).sum())
    back = r.to_source(r.recon_plus_visible)
    assert back.shape == (40, 80)


def test_region_strategy_masks_inside_the_region(model):
    r = reconstruct(model, IMAGE, region_mask=MASK, strategy="region", ratio=0.25)
    assert r.metrics["strategy"] == "region" and not r.metrics["notes"]
    from mim_workbench.io import letterbox, read_image, read_mask

    src = read_image(IMAGE).data
    region, _ = letterbox(read_mask(MASK, shape=src.shape[:2]), (64, 64), order=0)
    # Every masked pixel lies in a patch that overlaps the lungs (25 % < their share of the image).
    p = model.patch_size
    g = 64 // p
    cov = region.reshape(g, p, g, p).max(axis=(1, 3)) > 0
    masked_patches = r.mask.reshape(g, p, g, p).all(axis=(1, 3))
    assert masked_patches.any() and not (masked_patches & ~cov).any()
    # Without a region mask, region masking falls back to random and says so.
    r2 = reconstruct(model, IMAGE, strategy="region")
    assert r2.metrics["strategy"] == "random" and r2.metrics["notes"]


def test_from_checkpoint_equals_from_model(model, tmp_path):
    meta = {"kind": "pretrain", "config": {"strategy": "random", "ratio": 0.6}, "model_config": model.cfg.to_dict()}
    save_checkpoint(tmp_path, 1, model_state=model.state_dict(), optimizer_state=None, meta=meta)
    a = reconstruct(tmp_path, IMAGE, seed=2)           # run directory -> latest checkpoint
    b = reconstruct(model, IMAGE, seed=2, ratio=0.6)
    assert a.metrics["ratio"] == 0.6                    # the checkpoint's training ratio is the default
    assert np.allclose(a.reconstruction, b.reconstruction, atol=1e-6)


def test_bad_inputs(model):
    with pytest.raises(ConfigError, match="ratio"):
        reconstruct(model, IMAGE, ratio=1.0)
    with pytest.raises(ConfigError, match="2-D"):
        reconstruct(model, np.zeros((2, 3, 4, 5)))


def test_masked_metrics_by_hand():
    truth = np.array([[[0.0, 1.0], [0.5, 0.5]]], dtype=np.float32)       # [1, 2, 2]
    masked = np.array([[True, True], [False, False]])
    content = np.ones((2, 2), dtype=bool)
    m = masked_metrics(truth, truth.copy(), masked, content)
    assert m["mse"] == 0 and m["psnr"] == math.inf
    assert m["mse_baseline"] == pytest.approx(0.25) and m["psnr_baseline"] == pytest.approx(psnr(0.25))
    none = masked_metrics(truth, truth, masked, np.zeros((2, 2), dtype=bool))
    assert none["mse"] is None and none["n_pixels"] == 0


def test_biharmonic_baseline_fills_smooth_holes_and_mean_fill_does_not():
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    truth = (0.2 + 0.3 * xx + 0.4 * yy ** 2)[None].astype(np.float32)   # smooth, like soft tissue
    masked = np.zeros((64, 64), bool)
    masked[16:32, 16:32] = masked[40:56, 8:24] = True
    m = masked_metrics(truth, truth.copy(), masked, np.ones((64, 64), bool), biharmonic=True)
    assert m["psnr_biharmonic"] > 45 > m["psnr_baseline"] + 15
    assert "psnr_biharmonic" not in masked_metrics(truth, truth, masked, np.ones((64, 64), bool))


def test_reconstruction_reports_both_baselines(model):
    m = reconstruct(model, IMAGE, ratio=0.5, seed=0).metrics
    assert m["psnr_biharmonic"] is not None and math.isfinite(m["psnr_biharmonic"])
    assert m["psnr_baseline"] is not None


def test_save_writes_cropped_pictures_and_metrics(model, tmp_path):
    import json

    from PIL import Image

    wide = np.random.default_rng(0).random((40, 80)).astype(np.float32)
    r = reconstruct(model, wide, ratio=0.5)
    paths = r.save(tmp_path / "out", extra={"image": "wide"})
    assert [p.name for p in paths] == ["image.png", "masked.png", "reconstruction.png", "recon_plus_visible.png",
                                       "error.png", "metrics.json"]
    assert Image.open(paths[0]).size == (64, 32)          # padding cropped off (W, H)
    assert Image.open(paths[4]).mode == "RGB"
    m = json.loads(paths[-1].read_text())
    assert m["image"] == "wide" and m["letterbox"]["content_shape"] == [32, 64] and m["mse"] == r.metrics["mse"]
