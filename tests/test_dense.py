"""Dense head from strokes: the stroke simulator, window upsampling, train / predict / save / load.

The acceptance test trains on 5 dental panoramics of ../shared/data/dental_dc1000
(a generated fixture when the shared data are absent) with simulated strokes on
< 2 % of the pixels and scores caries pixels on 10 other images.  Its encoder is
a *random* tiny ViT: the AUC comes from the per-patch classifier on random patch
features (local intensity / texture statistics) plus the conv refinement on the
image channels, not from pretraining (benchmarks compare pretrained encoders).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_dir

from mim_workbench.errors import CheckpointError, ConfigError
from mim_workbench.models import ModelConfig
from mim_workbench.models.dense_head import upsample_window
from mim_workbench.training import events as ev
from mim_workbench.models.dense import DenseConfig, DenseHead
from mim_workbench.training.dense import predict_dense, read_strokes, train_dense
from mim_workbench.training.class_metrics import pixel_auc
from mim_workbench.training.strokes import simulate_strokes, stroke_summary

TINY = ModelConfig.from_dict(dict(img_size=(64, 64), embed_dim=64, depth=2, num_heads=2))


def synthetic_panoramic(seed: int, shape: tuple[int, int] = (160, 320)) -> tuple[np.ndarray, np.ndarray]:
    """A dark, noisy jaw with two rows of bright teeth; caries are darker spots inside some crowns."""
    rng = np.random.default_rng(seed)
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    img = 0.15 + 0.1 * np.sin(xx / W * np.pi) + rng.normal(0, 0.03, shape)
    caries = np.zeros(shape, dtype=bool)
    for row, (top, bottom) in enumerate(((0.2, 0.48), (0.52, 0.8))):
        for k in range(12):
            c0, c1 = int((0.05 + k * 0.075) * W), int((0.05 + k * 0.075 + 0.06) * W)
            r0, r1 = int(top * H), int(bottom * H)
            img[r0:r1, c0:c1] = 0.7 + rng.normal(0, 0.03, (r1 - r0, c1 - c0))
            if rng.random() < 0.4:
                cy = r0 + 4 if row == 0 else r1 - 5
                cx = int(rng.integers(c0 + 4, c1 - 4))
                spot = (yy - cy) ** 2 / 9 + (xx - cx) ** 2 / 9 <= 1
                img[spot] = 0.45
                caries |= spot
    return np.clip(img, 0, 1).astype(np.float32), caries


def dental_images(n_train: int = 5, n_test: int = 10):
    root = shared_data_dir()
    d = root / "dental_dc1000" if root is not None else None
    if d is not None and (d / "images").is_dir() and (d / "caries_masks").is_dir():
        from PIL import Image

        ids = sorted(p.stem for p in (d / "images").glob("*.png"))[: n_train + n_test]
        load = [(np.asarray(Image.open(d / "images" / f"{i}.png").convert("L"), dtype=np.float32) / 255.0,
                 np.asarray(Image.open(d / "caries_masks" / f"{i}.png")) > 0) for i in ids]
        source = "dental_dc1000"
    else:
        load = [synthetic_panoramic(s) for s in range(n_train + n_test)]
        source = "synthetic"
    return load[:n_train], load[n_train:], source


# ---------------------------------------------------------------- strokes
def test_simulated_strokes_stay_inside_and_under_budget():
    img, caries = synthetic_panoramic(0)
    teeth = img > 0.6
    lab = simulate_strokes({"caries": caries, "tooth": teeth & ~caries}, fraction=0.02, width=3, seed=1)
    s = stroke_summary(lab)
    assert 0.01 < s["fraction"] < 0.02 and set(s["pixels"]) == {1, 2, 3}
    assert not ((lab == 1) & ~caries).any() and not ((lab == 2) & ~(teeth & ~caries)).any()
    near = np.zeros_like(caries)
    from scipy import ndimage

    near = ndimage.binary_dilation(caries | teeth, iterations=6)
    assert not ((lab == 3) & near).any()                       # background keeps a margin
    assert s["pixels"][1] <= 0.5 * caries.sum() + 1            # small classes only partly painted
    again = simulate_strokes({"caries": caries, "tooth": teeth & ~caries}, fraction=0.02, width=3, seed=1)
    assert np.array_equal(lab, again)
    other = simulate_strokes({"caries": caries, "tooth": teeth & ~caries}, fraction=0.02, width=3, seed=2)
    assert not np.array_equal(lab, other)
    lab2 = simulate_strokes({4: caries}, fraction=0.005, background=None, seed=0)
    assert set(np.unique(lab2)) <= {0, 4} and (lab2 > 0).mean() < 0.005
    with pytest.raises(ConfigError):
        simulate_strokes({}, fraction=0.02)
    with pytest.raises(ConfigError):
        simulate_strokes({"a": caries}, fraction=1.5)


def test_upsample_window_matches_full_interpolation():
    g = torch.randn(1, 3, 5, 7)
    full = F.interpolate(g, scale_factor=8, mode="bilinear", align_corners=False)
    for r0, c0, h, w in [(0, 0, 40, 56), (5, 9, 13, 17), (30, 50, 10, 6), (16, 0, 1, 1)]:
        assert torch.allclose(upsample_window(g, 8, r0, c0, h, w), full[..., r0:r0 + h, c0:c0 + w], atol=1e-5)
    assert upsample_window(g, 8, -4, -4, 60, 70).shape == (1, 3, 60, 70)   # past the edges: clamped


def test_read_strokes(tmp_path):
    from PIL import Image

    lab = np.zeros((20, 30), dtype=np.uint8)
    lab[2:4, 5:9] = 1
    lab[10, 10:20] = 2
    Image.fromarray(lab).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", lab.astype(np.int32))
    assert np.array_equal(read_strokes(tmp_path / "a.png"), lab)
    assert np.array_equal(read_strokes(tmp_path / "b.npy"), lab)
    assert read_strokes(tmp_path / "a.png", (40, 60)).shape == (40, 60)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ConfigError):
        read_strokes(tmp_path / "rgb.png")


# ---------------------------------------------------------------- acceptance
def test_dense_head_finds_caries_from_strokes(tmp_path):
    """Strokes on < 2 % of the pixels of 5 images train a dense head that finds caries on 10 others
    (pixel AUC >= 0.6), in under 3 minutes of training."""
    torch.set_num_threads(1)
    train, test, source = dental_images()
    strokes = [simulate_strokes({"caries": m}, fraction=0.02, width=3, seed=i) for i, (_, m) in enumerate(train)]
    assert all((s > 0).mean() < 0.02 for s in strokes)
    t0 = time.perf_counter()
    events: list = []
    head = train_dense([im for im, _ in train], strokes, checkpoint=None, model_config=TINY,
                       config=DenseConfig(classes=["caries", "other"], scale=0.5, steps=150, seed=0),
                       out=tmp_path / "dense", on_event=events.append)
    train_s = time.perf_counter() - t0
    preds = [head.predict(im) for im, _ in test]
    auc = pixel_auc([p.prob("caries") for p in preds], [m for _, m in test])
    intensity = pixel_auc([im for im, _ in test], [m for _, m in test])
    print(f"\n{source}: caries-pixel AUC {auc:.3f} (image intensity alone {intensity:.3f}); "
          f"training {train_s:.1f} s, stroke fraction {np.mean([(s > 0).mean() for s in strokes]):.4f}")
    assert auc is not None and auc >= 0.6
    assert train_s < 180
    assert [type(e).__name__ for e in events][0] == "Started" and isinstance(events[-1], ev.Finished)
    p = preds[0]
    assert p.probs.shape == (2,) + test[0][0].shape and np.allclose(p.probs.sum(0), 1, atol=1e-4)
    assert p.labels.dtype == np.uint8 and set(np.unique(p.labels)) <= {1, 2}
    # Saved and reloaded: the same maps.
    again = DenseHead.load(tmp_path / "dense")
    assert again.classes == ["caries", "other"]
    q = predict_dense(tmp_path / "dense", test[0][0])
    assert np.allclose(q.probs, p.probs, atol=1e-5)


def test_letterbox_mode_features_only_and_errors(tmp_path):
    img, car = synthetic_panoramic(3, shape=(90, 200))
    lab = simulate_strokes({"caries": car}, fraction=0.05, seed=0)
    head = train_dense([img], [lab], model_config=TINY, mode="letterbox", refine=False, steps=5, batch_size=2,
                       crop=32)
    pred = head.predict(img)
    assert pred.probs.shape == (2, 90, 200) and head.classes == ["class 1", "class 2"]
    image_only = train_dense([img], [lab], model_config=TINY, use_features=False, steps=3, batch_size=2, crop=32)
    assert image_only.predict(img[:50, :60]).probs.shape == (2, 50, 60)
    with pytest.raises(ConfigError, match="two classes"):
        train_dense([img], [np.where(lab == 1, 1, 0)], model_config=TINY, steps=2)
    with pytest.raises(ConfigError):
        train_dense([img], [lab[:10]], model_config=TINY, steps=2)
    with pytest.raises(ConfigError):
        DenseConfig(mode="stretch")
    with pytest.raises(CheckpointError):
        DenseHead.load(tmp_path / "missing")
