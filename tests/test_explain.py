"""What an encoder learned, headless: attention and feature maps, embeddings, similar cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE, SAMPLE_IMAGES, tiny, tiny_classifier

from mim_workbench.errors import CheckpointError, ConfigError, MimError
from mim_workbench.inference.embed import EmbeddingIndex, embed_dataset, knn_agreement, similar
from mim_workbench.inference.explain import Explainer, fit_patch_pca
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain

IMAGES = sorted(SAMPLE_IMAGES.glob("*.png"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "run"
    pretrain(PretrainConfig.from_dict(tiny(out, max_steps=2, threads=1)))
    return out


def test_attention_maps_sum_and_shape_as_documented(run):
    from mim_workbench.io.model_input import as_unit_array

    exp = Explainer(run).explain(IMAGES[0])
    shape = as_unit_array(IMAGES[0]).shape[:2]
    heads = exp.grid["attn_heads"]                                     # [heads, gh, gw]
    assert heads.shape == (2, 4, 4) and (heads >= 0).all()
    assert ((heads.sum(axis=(1, 2)) > 0) & (heads.sum(axis=(1, 2)) <= 1 + 1e-5)).all()   # the rest: the class token
    assert exp.attn_heads.shape == (2, *shape) and exp.attn_mean.shape == exp.rollout.shape == shape
    np.testing.assert_allclose(exp.grid["rollout"].min(), 0.0, atol=1e-6)
    np.testing.assert_allclose(exp.grid["rollout"].max(), 1.0, atol=1e-6)
    assert exp.pca_rgb is None and exp.cams == {}


def test_feature_colours_are_fixed_by_the_fitting_set(run, tmp_path):
    explainer = Explainer(run)
    a = fit_patch_pca(explainer, IMAGES[:4])
    b = fit_patch_pca(explainer, IMAGES[:4])
    rgb_a = explainer.explain(IMAGES[5], pca=a).pca_rgb
    rgb_b = explainer.explain(IMAGES[5], pca=b).pca_rgb
    assert rgb_a.shape[-1] == 3 and np.array_equal(rgb_a, rgb_b) and 0 <= rgb_a.min() and rgb_a.max() <= 1
    names = {p.name for p in explainer.explain(IMAGES[5], pca=a).save(tmp_path)}
    assert {"attn_mean.png", "attn_head_0.png", "attn_head_1.png", "rollout.png", "pca_rgb.png",
            "attn_heads.tif", "rollout.tif"} <= names
    with pytest.raises(ValueError, match="at least one image"):
        fit_patch_pca(explainer, [])


def test_a_classifier_adds_its_class_activation_maps(tmp_path):
    ckpt = tiny_classifier(tmp_path / "probe")
    explainer = Explainer(ckpt)
    exp = explainer.explain(IMAGES[0], classes=list(explainer.classes))
    assert sorted(exp.cams) == sorted(explainer.classes) and all(m.shape == exp.rollout.shape for m in exp.cams.values())
    assert len(explainer.explain(IMAGES[0]).cams) == 1                  # the predicted class
    with pytest.raises(ConfigError, match="'Fracture' is not one of"):
        explainer.explain(IMAGES[0], classes=["Fracture"])


def test_checkpoints_without_an_encoder_are_refused(tmp_path):
    with pytest.raises(CheckpointError):
        Explainer(tmp_path)                                             # an empty folder
    with pytest.raises(CheckpointError, match="scratch: no such checkpoint"):
        Explainer("scratch")                                            # a random encoder explains nothing


def test_embeddings_are_cached_and_redone_when_the_checkpoint_changes(run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    done: list[tuple[int, int]] = []
    index = embed_dataset(run, SAMPLE, tmp_path / "idx", on_progress=lambda d, t: done.append((d, t)))
    n = len(index.rows)
    assert n >= 12 and index.vectors.shape[0] == n and np.allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-5)
    done.clear()
    again = embed_dataset(run, SAMPLE, tmp_path / "idx", on_progress=lambda d, t: done.append((d, t)))
    assert done == [] and np.array_equal(again.vectors, index.vectors), "nothing embedded again"
    changed = tmp_path / "changed"
    shutil.copytree(run, changed)
    weights = next(changed.glob("ckpt-*")) / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.startswith("encoder.blocks.0.attn.qkv.weight"))
    save_file({**state, key: state[key] * 2}, str(weights))
    done.clear()
    redone = embed_dataset(changed, SAMPLE, tmp_path / "idx", on_progress=lambda d, t: done.append((d, t)))
    assert done and done[-1] == (n, n) and redone.digest != index.digest
    assert not np.allclose(redone.vectors, index.vectors)
    with pytest.raises(MimError, match="empty: no images found"):
        (tmp_path / "empty").mkdir()
        embed_dataset(run, tmp_path / "empty", tmp_path / "idx2")


def _synthetic_index(tmp_path) -> EmbeddingIndex:
    """Two tight clusters on the unit circle's opposite sides, with one mislabelled point."""
    g = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    vectors, rows = [], []
    for i in range(20):
        c = i % 2
        v = centres[c] + 0.05 * g.standard_normal(3)
        vectors.append(v / np.linalg.norm(v))
        rows.append({"path": f"/x/{i}.png", "id": str(i), "label": "ab"[c], "patient": f"p{i // 4}",
                     "fingerprint": [f"/x/{i}.png", 0, 0]})
    return EmbeddingIndex(tmp_path, "ckpt", "d", "token", rows, np.array(vectors, np.float32))


def test_knn_agreement_and_neighbours_on_a_set_with_known_answers(tmp_path):
    index = _synthetic_index(tmp_path)
    assert knn_agreement(index.vectors, index.labels(), k=5) == 1.0
    flipped = index.labels()
    flipped[0] = "b"
    assert knn_agreement(index.vectors, flipped, k=5) == pytest.approx(19 / 20)
    assert knn_agreement(index.vectors, [None] * 20) is None
    hits = similar(index, "/x/4.png", k=5)
    assert hits[0] == {"path": "/x/4.png", "distance": 0.0, "label": "a"}
    assert all(h["label"] == "a" for h in hits) and [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    others = similar(index, "/x/4.png", k=5, exclude_same_patient=True)
    assert others[0]["path"] == "/x/4.png" and not any(h["path"] == "/x/6.png" for h in others)   # 6: patient p1


def test_embed_and_similar_commands(run, tmp_path, capsys):
    from mim_workbench.cli import main

    assert main(["embed", "--checkpoint", str(run), "--data", str(SAMPLE / "paediatric"), "--out",
                 str(tmp_path / "idx"), "--quiet"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["images"] == 48 and 0.0 <= last["knn_agreement"] <= 1.0 and last["k"] == 20
    query = json.loads((tmp_path / "idx" / "index.json").read_text())["rows"][3]["path"]
    assert main(["similar", "--index", str(tmp_path / "idx"), "--image", query, "-k", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 4 and rows[0]["path"] == query and rows[0]["distance"] == 0.0
    assert main(["explain", "--checkpoint", str(run), "--image", str(IMAGES[0]), "--out", str(tmp_path / "ex")]) == 0
    assert (tmp_path / "ex" / "pca_rgb.png").is_file()
    assert main(["similar", "--index", str(tmp_path), "--image", query]) == 2     # not an index: one line, exit 2
    assert "not an embedding index" in capsys.readouterr().err
    torch.manual_seed(0)


def test_large_images_are_reduced_and_explained_tile_by_tile(run, monkeypatch, tmp_path, capsys):
    import dask.array as da

    from mim_workbench.inference import explain as explain_module
    from mim_workbench.io.model_input import as_unit_array

    monkeypatch.setattr(explain_module, "MAX_MAP_SIDE", 256)
    from mim_workbench.io.letterbox import fit_shape

    pixels = (np.tile(as_unit_array(IMAGES[0]), (3, 2)) * 65535).astype(np.uint16)       # taller than wide
    big = da.from_array(pixels, chunks=128)
    reduced = fit_shape(pixels.shape, (256, 256))
    assert reduced[0] == 256 and 128 < reduced[1] < 256
    explainer = Explainer(run)
    exp = explainer.explain(big)
    assert exp.attn_mean.shape == reduced and exp.scale == pytest.approx(pixels.shape[0] / 256) and exp.tiles == 1
    done: list[tuple[int, int]] = []
    tiled = explainer.explain_tiled(big, tile=128, on_tile=lambda k, n: done.append((k, n)))
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)] and tiled.tiles == 4
    assert tiled.attn_heads.shape == (2, *reduced) and tiled.pca_rgb.shape == (*reduced, 3)
    for r0, c0 in ((0, 0), (0, 128), (128, 0), (128, 128)):
        block = tiled.rollout[r0:r0 + 128, c0:c0 + 128]
        assert 0.5 < block.max() <= 1.0 + 1e-5, "each tile's rollout is its own, scaled to 1"
    assert 0.0 <= tiled.pca_rgb.min() and tiled.pca_rgb.max() <= 1.0
    with pytest.raises(ConfigError, match="tile=8"):
        explainer.explain_tiled(big, tile=8)

    from mim_workbench.cli import main

    monkeypatch.undo()                                                   # the image at its own 409 x 512

    assert main(["explain", "--checkpoint", str(run), "--image", str(IMAGES[0]), "--out", str(tmp_path / "t"),
                 "--tiled", "--tile", "112"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    side = as_unit_array(IMAGES[0]).shape[:2]
    assert record["tiles"] == -(-side[0] // 112) * -(-side[1] // 112) and record["shape"] == list(side)
    assert "pca_rgb.png" in record["files"]
