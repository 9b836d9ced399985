"""predict(): class probabilities + maps on the image grid; dense maps; folder outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from _mim_tiny import SAMPLE, SAMPLE_IMAGES

from mim_workbench.errors import CheckpointError, ConfigError
from mim_workbench.inference.predict import Predictor, load_predictor, predict, predict_folder, predict_one
from mim_workbench.io import letterbox, read_image
from mim_workbench.models import ModelConfig
from mim_workbench.models.dense import DensePrediction
from mim_workbench.training.dense import train_dense
from mim_workbench.training.finetune import FinetuneConfig, finetune
from mim_workbench.training.strokes import simulate_strokes

ARCH = {"img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2}
IMAGE = SAMPLE_IMAGES / "cxr0059.png"          # 512 x 408: letterboxed, not square


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cls")
    out = {}
    for mode in ("probe", "full"):
        res = finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE), checkpoint=None, mode=mode, out=str(root / mode),
                                      epochs=2, batch_size=4, threads=1, **ARCH)))
        out[mode] = res.checkpoint
    return out


def test_prediction_probs_and_maps_on_the_image_grid(classifiers):
    shape = read_image(IMAGE).data.shape
    for mode, kind in (("probe", "patch_logits"), ("full", "patch_logits")):   # both pool by averaging
        p = predict(classifiers[mode], IMAGE)
        assert p.classes == ["COVID-19", "Other pneumonia"]
        assert p.probs.shape == (2,) and p.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert p.label in p.classes and p.map_class == p.label
        assert p.map_kind == kind and p.map.shape == shape and p.map.dtype == np.float32
        assert p.patch_map.shape == (4, 4) and np.isfinite(p.map).all()
    # Both pool by averaging: the patch-logit map averages to the image logit.
    canvas, _ = letterbox(read_image(IMAGE).data, (64, 64), order=1)
    for mode in ("probe", "full"):
        model = Predictor(classifiers[mode])
        p = model(IMAGE)
        with torch.no_grad():
            logit = model.model(torch.from_numpy(canvas)[None, None].float())[0, p.index]
        assert float(p.patch_map.mean()) == pytest.approx(float(logit), abs=1e-4), mode
    full = Predictor(classifiers["full"])
    r = full(IMAGE, map="rollout")
    assert r.map_kind == "rollout" and 0.0 <= r.map.min() and r.map.max() <= 1.0 + 1e-5
    with pytest.raises(ConfigError):
        full(IMAGE, map="gradcam")


def test_predict_outputs_json_csv_tiff_png(classifiers, tmp_path):
    j = predict_one(classifiers["full"], IMAGE, tmp_path / "one")
    rec = json.loads(j.read_text())
    assert set(rec["probs"]) == {"COVID-19", "Other pneumonia"} and rec["map_kind"] == "patch_logits"
    tif = tifffile.imread(tmp_path / "one" / "cxr0059_map.tif")
    assert tif.shape == read_image(IMAGE).data.shape and tif.dtype == np.float32
    assert (tmp_path / "one" / "cxr0059_map.png").is_file()
    c = predict_folder(classifiers["probe"], SAMPLE, tmp_path / "many")
    rows = list(csv.DictReader(open(c)))
    assert len(rows) == 12 and {"id", "true_label", "predicted", "prob_COVID-19"} <= set(rows[0])
    assert all(abs(float(r["prob_COVID-19"]) + float(r["prob_Other pneumonia"]) - 1) < 1e-4 for r in rows)
    assert len(list((tmp_path / "many").glob("*_map.tif"))) == 12


def test_a_probe_on_mean_pooled_features_is_rebuilt_as_trained(tmp_path):
    res = finetune(FinetuneConfig.from_dict(dict(data=str(SAMPLE), checkpoint=None, mode="probe", pool="avg", out=str(tmp_path / "p"),
                                  epochs=2, batch_size=4, threads=1, **ARCH)))
    pred = load_predictor(res.checkpoint)
    assert pred.model.pool == "avg"
    x = torch.rand(1, 1, 64, 64)
    tokens = pred.model.tokens(x)
    assert torch.allclose(pred.model.features(x), tokens[:, 1:].mean(dim=1))


def test_predict_dense_checkpoint_and_wrong_kind(tmp_path):
    img = read_image(IMAGE).data
    lungs = read_image(SAMPLE / "masks" / "cxr0059.png").data > 0.5
    lab = simulate_strokes({"lung": lungs}, fraction=0.02, seed=0)
    head = train_dense([img], [lab], model_config=ModelConfig.from_dict(ARCH), classes=["lung", "outside"], steps=4,
                       batch_size=2, crop=32, out=tmp_path / "dense")
    pred = predict(head.checkpoint, IMAGE)
    assert isinstance(pred, DensePrediction) and pred.probs.shape == (2,) + img.shape
    j = predict_one(tmp_path / "dense", IMAGE, tmp_path / "dout")
    rec = json.loads(j.read_text())
    assert rec["classes"] == ["lung", "outside"] and "cxr0059_probs.tif" in rec["files"]
    probs = tifffile.imread(tmp_path / "dout" / "cxr0059_probs.tif")
    assert probs.shape == (2,) + img.shape
    with pytest.raises(CheckpointError):
        Predictor(tmp_path / "dense")
    from _mim_tiny import tiny

    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain

    pre = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "pre", max_steps=1, threads=1)))
    with pytest.raises(CheckpointError, match="pretrain"):
        load_predictor(pre.last_checkpoint)
