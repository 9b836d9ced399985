"""Large images: on-disk pyramids, multiscale reader, level masks, crop pretraining, tiled inference.

The 5000x4000 16-bit MG DICOM and the 30000x30000 pyramidal TIFF are synthetic and
written once per session (tests/_large_images.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import _large_images as L

from mim_workbench.inference.tiling import argmax_labels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def large_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "large_images"


@pytest.fixture
def cache_env(large_dir, monkeypatch) -> Path:
    """One pyramid cache for the whole session (built once), never the user's."""
    root = large_dir / "cache"
    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(root))
    return root


@pytest.fixture
def mammo(large_dir) -> Path:
    large_dir.mkdir(parents=True, exist_ok=True)
    return L.mammogram(large_dir)


@pytest.fixture
def big_tiff(large_dir) -> Path:
    large_dir.mkdir(parents=True, exist_ok=True)
    return L.pyramidal_tiff(large_dir)


def test_mammogram_dicom_opens_as_multiscale_with_spacing(mammo, cache_env):
    from mim_workbench_napari._reader import get_reader

    reader = get_reader(str(mammo))
    assert reader is not None
    layers = reader(str(mammo))
    assert len(layers) == 1
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["multiscale"] is True
    assert kwargs["scale"] == pytest.approx(L.MAMMO_SPACING)          # ImagerPixelSpacing, mm
    assert tuple(data[0].shape) == L.MAMMO_SHAPE
    assert all(a.shape[0] < b.shape[0] for b, a in zip(data, data[1:]))
    assert max(data[-1].shape) <= 256
    assert data[0].dtype == np.uint16 and kwargs["contrast_limits"] == (0.0, 65535.0)
    meta = kwargs["metadata"]["mim_workbench"]
    assert meta["modality"] == "MG" and meta["window_source"] == "dicom_window"
    store = Path(kwargs["metadata"]["mim_workbench_pyramid"]["store"])
    assert store.is_relative_to(cache_env)
    # level 0 is the reader's windowed image, quantised to 16 bits
    from mim_workbench.io import read_image

    ref = np.asarray(read_image(mammo).data[2000:2100, 1000:1100])
    got = np.asarray(data[0][2000:2100, 1000:1100]) / 65535.0
    assert np.abs(got - ref).max() < 1e-4


def test_pyramid_cache_is_reused_and_never_stale(mammo, cache_env, tmp_path):
    import shutil

    from mim_workbench.io.pyramid import open_pyramid

    a = open_pyramid(mammo)
    b = open_pyramid(mammo)
    assert a.store == b.store and a.built
    copy = tmp_path / "copy.dcm"
    shutil.copy(mammo, copy)
    c = open_pyramid(copy)
    os.utime(copy, ns=(0, 10**18))  # the source changed: another key, rebuilt
    d = open_pyramid(copy)
    assert c.store != d.store and d.store.is_dir()
    assert open_pyramid(copy, chunk=256).store != d.store  # another setting: another key
    # coarser levels are 2x2 means of the finer one
    l0 = np.asarray(a.levels[0][:64, :64], dtype=np.float64)
    l1 = np.asarray(a.levels[1][:32, :32], dtype=np.float64)
    assert np.abs(l0.reshape(32, 2, 32, 2).mean(axis=(1, 3)) - l1).max() <= 0.5
    assert a.scale(2) == pytest.approx((L.MAMMO_SPACING[0] * 4, L.MAMMO_SPACING[1] * 4))
    assert a.level_for_spacing(0.3) == 2


def test_pyramid_cache_drops_the_least_recently_opened_beyond_its_cap(tmp_path, monkeypatch):
    import time

    from PIL import Image

    from mim_workbench.io.pyramid import KEEP_RECENT_S, open_pyramid, pyramid_cache_entries, prune_pyramid_cache

    root = tmp_path / "pyramids"
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (700, 500), dtype=np.uint8)).save(paths[-1])
    stores = [open_pyramid(p, cache_root=root).store for p in paths]
    sizes = {e: size for _, size, e in pyramid_cache_entries(root)}
    assert set(sizes) == set(stores) and all(v > 0 for v in sizes.values())
    old = time.time() - KEEP_RECENT_S - 3600
    for store in stores[:2]:                     # a and b were last opened two days ago...
        os.utime(store / "zarr.json", (old, old))
    open_pyramid(paths[0], cache_root=root)     # ...and a again just now: opening stamps it
    cap = sizes[stores[0]] + sizes[stores[2]] + 1
    assert prune_pyramid_cache(root, max_bytes=cap) == [stores[1]]
    assert stores[0].is_dir() and not stores[1].exists() and stores[2].is_dir()
    # under the cap, or all recently opened: nothing goes
    assert prune_pyramid_cache(root, max_bytes=cap) == []
    assert prune_pyramid_cache(root, max_bytes=1) == [], "a pyramid opened today may be in use"
    monkeypatch.setenv("MIM_WORKBENCH_PYRAMID_CACHE_GB", "0")   # the cap from the environment
    later = time.time() + 2 * KEEP_RECENT_S
    assert prune_pyramid_cache(root, now=later) == [stores[2], stores[0]], "least recently opened first"


def test_pyramidal_tiff_30000_opens_multiscale_with_bounded_memory(big_tiff, cache_env):
    script = textwrap.dedent(f"""
        import json, sys, psutil
        import numpy as np
        sys.modules["triton"] = None
        from mim_workbench_napari._reader import read_layers
        proc = psutil.Process()
        before = proc.memory_info().rss
        (data, kwargs, kind), = read_layers({str(big_tiff)!r})
        coarse = np.asarray(data[-1])                       # what napari shows first
        window0 = np.asarray(data[0][14000:15024, 14000:15024])   # zoomed in: a few tiles
        window1 = np.asarray(data[1][7000:8024, 7000:8024])
        after = proc.memory_info().rss
        print(json.dumps({{"growth_mb": (after - before) / 2**20, "multiscale": kwargs["multiscale"],
                           "shapes": [list(a.shape) for a in data], "built": kwargs["metadata"]["mim_workbench_pyramid"]["built"],
                           "coarse_mean": float(coarse.mean()), "w0": float(window0.mean())}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["multiscale"] is True and out["built"] is False       # the file's own levels, nothing copied
    assert out["shapes"][0] == [L.BIG_SIDE, L.BIG_SIDE] and len(out["shapes"]) >= 5
    assert out["growth_mb"] < 300, out
    assert 0 < out["coarse_mean"] < 255 and 0 < out["w0"] < 255


def test_region_mask_painted_at_a_low_level_resamples_to_any_level(mammo, cache_env):
    from mim_workbench.io.level_masks import resample_mask
    from mim_workbench.io.pyramid import open_pyramid
    from mim_workbench.regions.large import propose_region_large

    pyr = open_pyramid(mammo)
    lm = propose_region_large(pyr, "breast", exclude_pectoral=True)
    assert max(lm.mask.shape) <= 1024 and lm.mask.shape == pyr.level_shape(lm.level)
    assert lm.scale == pytest.approx(pyr.scale(lm.level))
    assert 0.2 < lm.mask.mean() < 0.9
    full = lm.at_level(pyr, 0)
    assert full.shape == L.MAMMO_SHAPE and full.dtype == np.uint8
    # physical alignment: level-0 pixel (r, c) takes the low-level pixel under it
    f = pyr.factor(lm.level)
    for r, c in [(10, 10), (2500, 300), (4990, 3990), (1234, 2345)]:
        assert full[r, c] == lm.mask[int((r + 0.5) / f[0]), int((c + 0.5) / f[1])]
    # a huge target stays lazy (a 30000² mask is never materialised)
    lazy = resample_mask(lm.mask, (30000, 30000))
    assert hasattr(lazy, "compute") and lazy[15000:15010, 100:110].compute().shape == (10, 10)


def _crop_data(large_dir: Path, mammo: Path) -> Path:
    from PIL import Image

    from mim_workbench.regions.large import propose_region_large

    root = large_dir / "crop_data"
    if not (root / "masks" / "m1.png").is_file():
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        link = root / "images" / "m1.dcm"
        if not link.exists():
            link.symlink_to(mammo)
        lm = propose_region_large(mammo, "breast")   # painted at a low level, as a user would
        Image.fromarray(lm.mask * 255).save(root / "masks" / "m1.png")
    return root


def test_crop_dataset_prefers_the_region_and_reads_the_fine_target_from_the_finer_level(large_dir, mammo, cache_env):
    from mim_workbench.training.crop_dataset import CropDataset
    from mim_workbench.io.datasets import discover

    root = _crop_data(large_dir, mammo)
    samples = discover(root / "images", masks=root / "masks").samples
    ds = CropDataset(samples, crop_size=64, level=2, fine_scale=2, crops_per_image=12, region_fraction=1.0)
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 64, 64) and item["fine"].shape == (1, 128, 128)
        assert item["region"].sum() > 0 and int(item["crop"][0]) == 2   # every crop overlaps the breast
        coarse_from_fine = item["fine"][0].reshape(64, 2, 64, 2).mean(dim=(1, 3))
        assert float((coarse_from_fine - item["image"][0]).abs().mean()) < 0.01
    assert ds[3]["crop"].tolist() == ds[3]["crop"].tolist()           # reproducible
    ds.set_epoch(1)
    assert any(ds[i]["crop"].tolist() != CropDataset(samples, crop_size=64, level=2, crops_per_image=12)[i]["crop"].tolist()
               for i in range(4))
    from mim_workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="finer"):
        CropDataset(samples, crop_size=64, level=0, fine_scale=2)


def test_crop_based_pretraining_run_and_tiled_cli(large_dir, mammo, cache_env, tmp_path):
    from _mim_tiny import TINY_MODEL

    from mim_workbench.cli import main
    from mim_workbench.training import pretrain
    from mim_workbench.training.config import PretrainConfig

    root = _crop_data(large_dir, mammo)
    cfg = PretrainConfig.from_dict(dict(data=str(root / "images"), masks=str(root / "masks"), out=str(tmp_path / "run"),
                         **TINY_MODEL, method="miram", strategy="region", crop_level=2, crops_per_image=8,
                         batch_size=4, epochs=1, threads=2, preview_every=1, val_fraction=0.0, seed=0))
    events: list = []
    res = pretrain(cfg, on_event=events.append)
    assert res.reason == "completed" and res.step == 2 and np.isfinite(res.final_loss)
    assert any(type(e).__name__ == "Preview" for e in events)
    saved = json.loads((Path(res.last_checkpoint) / "meta.json").read_text())["config"]
    assert saved["crop_level"] == 2
    # the CLI reconstructs the whole image at a level, tile by tile, into zarr maps
    out = tmp_path / "tiled"
    rc = main(["reconstruct", "--checkpoint", str(res.last_checkpoint), "--image", str(mammo), "--tiled",
               "--level", "3", "--region-preset", "breast", "--out", str(out), "--batch-size", "32"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tiles"] > 1 and metrics["level"] == 3 and metrics["strategy"] == "region"
    import zarr

    rec = zarr.open_group(str(out / "maps.zarr" / "reconstruction"), mode="r")
    assert rec.attrs["mim_workbench"]["complete"] is True and rec["0"].shape == (625, 500)


def test_tiled_reconstruction_of_the_whole_mammogram_streams_into_zarr(mammo, cache_env, tmp_path):
    import torch

    from mim_workbench.inference.tiled_reconstruct import reconstruct_tiled
    from mim_workbench.io.pyramid import open_pyramid
    from mim_workbench.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(dict(img_size=(256, 256), patch_size=32, embed_dim=32, depth=1, num_heads=2,
                                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)))
    pyr = open_pyramid(mammo)
    bands = []
    res = reconstruct_tiled(model, pyr, out=tmp_path / "maps.zarr", level=0, overlap=0.125, batch_size=32,
                            on_band=bands.append)
    assert len(bands) > 5 and bands[-1].row1 == L.MAMMO_SHAPE[0]
    assert all(a.row1 == b.row0 for a, b in zip(bands, bands[1:]))        # contiguous, in order
    assert bands[-1].tiles_done == bands[-1].tiles_total == res.tiles
    rec, err = res.output.levels("reconstruction"), res.output.levels("error")
    assert rec[0].shape == L.MAMMO_SHAPE and len(rec) >= 5
    r0 = np.asarray(rec[0][4900:5000, 3900:4000])                           # the last corner was written
    assert np.isfinite(r0).all() and np.abs(r0).sum() > 0
    coarse = np.asarray(err[-1][...])
    assert np.isfinite(coarse).all() and (coarse >= 0).all() and coarse.max() > 0
    assert res.metrics["n_pixels"] > 0 and np.isfinite(res.metrics["mse_baseline"])
    # bands are whole chunk rows, and the coarser levels (computed from each band in memory,
    # odd rows carried to the next band) are the 2x2 means of the finer ones, band seams included
    from mim_workbench.inference.tiling import band_rows
    from mim_workbench.io.pyramid import mean2x2

    assert rec[0].chunks[0] == band_rows(256, 0.125) == bands[0].row1
    for k in range(1, len(rec)):
        fine, c = np.asarray(rec[k - 1][...]), np.asarray(rec[k][...])
        assert np.allclose(mean2x2(fine), c, atol=1e-6), k


def test_tiled_prediction_maps_classifier_and_dense_head_cli(mammo, cache_env, tmp_path):
    """predict --tiled: a classifier's patch-logit map and a dense head's class maps of the whole mammogram."""
    import torch
    from _mim_tiny import SAMPLE

    from mim_workbench.cli import main
    from mim_workbench.inference.tiled_predict import predict_tiled
    from mim_workbench.io.pyramid import open_pyramid
    from mim_workbench.models import ModelConfig
    from mim_workbench.regions.large import propose_region_large
    from mim_workbench.models.dense import DenseHead
    from mim_workbench.training.dense import train_dense
    from mim_workbench.training.finetune import FinetuneConfig, finetune
    from mim_workbench.training.strokes import simulate_strokes

    torch.set_num_threads(2)
    arch = {"img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2}
    cls = finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE), checkpoint=None, mode="full", out=str(tmp_path / "cls"),
                                  epochs=1, batch_size=4, threads=2, **arch))).checkpoint
    out = tmp_path / "pred_cls"
    assert main(["predict", "--checkpoint", str(cls), "--image", str(mammo), "--tiled", "--level", "2",
                 "--batch-size", "32", "--out", str(out)]) == 0
    rec = json.loads((out / "predictions.json").read_text())
    assert rec["kind"] == "classifier" and rec["map_kind"] == "patch_logits" and rec["map_class"] == rec["label"]
    assert abs(sum(rec["probs"].values()) - 1) < 1e-4 and rec["tiles"] > 100 and rec["level"] == 2
    import zarr

    g = zarr.open_group(str(out / "maps.zarr" / "map"), mode="r")
    assert g.attrs["mim_workbench"]["complete"] is True and g["0"].shape == (1250, 1000)
    m = np.asarray(g["0"][...])
    assert np.isfinite(m).all() and m.std() > 0                     # a map, not a constant
    assert (out / f"{mammo.stem}_map.png").is_file()
    other = [c for c in rec["classes"] if c != rec["label"]][0]
    out2 = tmp_path / "pred_cls_other"
    assert main(["predict", "--checkpoint", str(cls), "--image", str(mammo), "--tiled", "--level", "3",
                 "--class", other, "--out", str(out2)]) == 0
    assert json.loads((out2 / "predictions.json").read_text())["map_class"] == other

    # a dense head trained on strokes of the breast / background at level 2
    pyr = open_pyramid(mammo)
    img = pyr.read_level(2)
    breast = np.asarray(propose_region_large(pyr, "breast").at_level(pyr, 2)) > 0
    strokes = simulate_strokes({"breast": breast, "background": ~breast}, fraction=0.01, seed=0)
    head = train_dense([img], [strokes], model_config=ModelConfig.from_dict(arch), classes=["breast", "background"],
                       steps=30, batch_size=4, crop=48, out=tmp_path / "dense")
    bands = []
    res = predict_tiled(head, pyr, out=tmp_path / "dense.zarr", level=2, batch_size=4, on_band=bands.append)
    assert res.kind == "dense" and list(res.maps) == ["breast", "background"] and len(bands) > 1
    assert all(a.row1 == b.row0 for a, b in zip(bands, bands[1:])) and bands[-1].row1 == 1250
    probs = np.stack([np.asarray(res.output.levels(n)[0][...]) for n in res.maps])
    assert probs.shape == (2, 1250, 1000) and np.isfinite(probs).all()
    assert np.abs(probs.sum(axis=0) - 1).max() < 1e-3               # blended distributions stay distributions
    whole = DenseHead.predict(head, img).probs                       # the same level in one piece
    agree = (probs.argmax(0) == whole.argmax(0)).mean()
    assert agree > 0.9, agree
    labels = argmax_labels(res.output, list(res.maps))               # what the viewer shows as dense: NAME
    assert [lv.shape for lv in labels] == [tuple(a.shape) for a in res.output.levels("breast")]
    np.testing.assert_array_equal(np.asarray(labels[0]), probs.argmax(0) + 1)
    out3 = tmp_path / "pred_dense"
    assert main(["dense-predict", "--checkpoint", str(head.checkpoint), "--image", str(mammo), "--tiled",
                 "--level", "3", "--out", str(out3)]) == 0
    rec3 = json.loads((out3 / "predictions.json").read_text())
    assert rec3["kind"] == "dense" and set(rec3["mean_prob"]) == {"breast", "background"}


def test_argmax_labels_read_the_maps_as_they_are_written(tmp_path):
    from mim_workbench.inference.tiling import ArgmaxLabels, create_output

    out = create_output(tmp_path / "maps.zarr", ["a", "b", "c"], (40, 30), scale=(0.5, 0.5), min_side=8)
    labels = argmax_labels(out, out.names)
    assert len(labels) == len(out.levels("a")) >= 2 and labels[0].dtype == np.uint8
    assert not np.asarray(labels[0]).any(), "nothing written yet: no label"
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=(20, 30)).transpose(2, 0, 1).astype(np.float32)   # the top half
    for k, name in enumerate(out.names):
        out.levels(name, mode="r+")[0][:20] = p[k]
    lab = labels[0]
    np.testing.assert_array_equal(lab[:20], p.argmax(0) + 1)
    assert not lab[20:].any()
    np.testing.assert_array_equal(lab[5:9, 3:7], (p.argmax(0) + 1)[5:9, 3:7])
    with pytest.raises(ValueError, match="differ in shape"):
        ArgmaxLabels([np.zeros((4, 4)), np.zeros((4, 5))])


def test_pretrain_cli_crop_flags(large_dir, mammo, cache_env, tmp_path, capsys):
    from _mim_tiny import tiny_cli_flags

    from mim_workbench.cli import build_parser, main
    from mim_workbench.cli.pretrain import pretrain_config_from_args

    parser, _ = build_parser()
    cfg = pretrain_config_from_args(parser.parse_args(
        ["pretrain", "--data", "d", "--out", "o", "--crop-spacing", "0.28", "--crops-per-image", "5",
         "--crop-region-fraction", "0.5"]))
    assert (cfg.crop_spacing, cfg.crops_per_image, cfg.crop_region_fraction, cfg.crop_level) == (0.28, 5, 0.5, None)
    root = _crop_data(large_dir, mammo)
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", str(root / "images"), "--masks", str(root / "masks"), "--out", str(out),
               *tiny_cli_flags(), "--strategy", "region", "--crop-level", "2", "--crops-per-image", "4",
               "--crop-region-fraction", "1.0", "--epochs", "1", "--val-fraction", "0", "--quiet"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["crop_level"], saved["crops_per_image"], saved["crop_region_fraction"]) == (2, 4, 1.0)
    assert (out / "latest").is_file()
    capsys.readouterr()
    assert main(["pretrain", "--data", str(root / "images"), "--out", str(tmp_path / "bad"),
                 "--crop-region-fraction", "1.5"]) == 2
    assert "crop_region_fraction" in capsys.readouterr().err
