"""Searching an embedding index by a box, and the embedding map's projection, colours and labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _mim_tiny import SAMPLE, tiny

from mim_workbench.errors import ConfigError, MimError
from mim_workbench.inference.embed import EmbeddingIndex, embed_dataset
from mim_workbench.inference.embedding_map import colour_columns, project, save_labels
from mim_workbench.inference.region_search import _best_windows, box_cells, cells_box, check_box, similar_region
from mim_workbench.io.model_input import as_unit_array
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain

PAEDIATRIC = SAMPLE / "paediatric"


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> EmbeddingIndex:
    root = tmp_path_factory.mktemp("region")
    pretrain(PretrainConfig.from_dict(tiny(root / "run", max_steps=2, threads=1)))
    return embed_dataset(root / "run", PAEDIATRIC, root / "idx")


def test_the_index_keeps_each_images_patch_grid_and_size(index):
    n = len(index.rows)
    assert index.patches.shape == (n, 64, 4, 4) and index.patches.dtype == np.float16
    assert index.img_size == (64, 64) and all(r["size"] == [224, 224] for r in index.rows)
    again = EmbeddingIndex.load(index.root)
    assert again.patches.shape == index.patches.shape and again.img_size == (64, 64)


def test_a_box_finds_the_image_it_was_cut_from(index):
    for row in (3, 20, 40):
        query = index.rows[row]["path"]
        hits = similar_region(index, query, (50, 30, 140, 120), k=3)
        assert hits[0]["path"] == query and hits[0]["distance"] < 1e-3, hits
        assert hits[0]["box"] == [0, 0, 168, 168]            # the box's cells, 56 px each at 224 px
        assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    assert len(similar_region(index, as_unit_array(index.rows[0]["path"]), (0, 0, 60, 60), k=48)) == 48


def test_the_best_window_is_where_the_pattern_is(tmp_path):
    g = np.random.default_rng(0)
    patches = g.standard_normal((5, 8, 6, 6)).astype(np.float16)
    target = np.ones(8, np.float32)
    patches[2, :, 3:5, 1:3] = target[:, None, None] * 5           # image 2 holds the pattern at rows 3-4, cols 1-2
    rows = [{"path": f"/x/{i}.png", "size": [120, 120]} for i in range(5)]
    idx = EmbeddingIndex(tmp_path, "c", "d", "token", rows, np.eye(5, 8, dtype=np.float32), patches, (60, 60))
    import torch

    best, where = _best_windows(idx, torch.nn.functional.normalize(torch.from_numpy(target), dim=0), (2, 2), 2)
    assert int(np.argmax(best)) == 2 and divmod(int(where[2]), 5) == (3, 1)
    assert cells_box((3, 1, 5, 3), (120, 120), (60, 60), (6, 6)) == (60, 20, 100, 60)
    assert box_cells((60, 20, 100, 60), (120, 120), (60, 60), (6, 6)) == (3, 1, 5, 3)


def test_bad_boxes_and_old_indexes_are_named(index, tmp_path):
    query = index.rows[0]["path"]
    with pytest.raises(ConfigError, match=r"lies outside the image \(224×224 pixels\)"):
        similar_region(index, query, (300, 10, 400, 50))
    with pytest.raises(ConfigError, match="bottom must be below top"):
        check_box((50, 10, 20, 40), (224, 224))
    assert check_box((-5, -5, 30.2, 500), (224, 224)) == (0, 0, 31, 224)
    old = EmbeddingIndex(tmp_path, index.checkpoint, index.digest, index.pool, index.rows, index.vectors)
    with pytest.raises(ConfigError, match="no patch features; run mim-workbench embed again"):
        similar_region(old, query, (0, 0, 50, 50))


def test_similar_command_searches_by_box(index, capsys):
    from mim_workbench.cli import main

    query = index.rows[5]["path"]
    assert main(["similar", "--index", str(index.root), "--image", query, "--box", "20,20,120,120", "-k", "3"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(hits) == 3 and hits[0]["path"] == query and len(hits[0]["box"]) == 4
    assert main(["similar", "--index", str(index.root), "--image", query, "--box", "1,2,3"]) == 2
    assert "--box '1,2,3': give four numbers" in capsys.readouterr().err


def test_projections_colours_and_labels(index, tmp_path):
    xy = project(index.vectors, "pca")
    assert xy.shape == (len(index.rows), 2) and np.array_equal(xy, project(index.vectors, "pca"))
    assert project(index.vectors, "tsne", seed=1).shape == xy.shape
    with pytest.raises(ConfigError, match="at least two images"):
        project(index.vectors[:1])
    with pytest.raises(ConfigError, match="projection 'mds'"):
        project(index.vectors, "mds")
    columns = colour_columns(index.rows, PAEDIATRIC)
    assert set(columns["label"]) == {"Normal", "Pneumonia"} and len(columns["label"]) == len(index.rows)


def test_colour_columns_include_every_column_of_the_table(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"im{i}.png")
    (folder / "labels.csv").write_text("id,label,site,age\nim0,a,north,7\nim1,b,south,\nim2,a,north,9\n")
    rows = [{"path": str(folder / f"im{i}.png"), "label": "ab"[i % 2]} for i in range(3)]
    columns = colour_columns(rows, folder)
    assert columns["site"] == ["north", "south", "north"] and columns["age"] == ["7", None, "9"]


def test_labels_are_merged_into_a_manifest_that_finetune_reads(tmp_path):
    from mim_workbench.io.datasets import discover

    images = sorted(PAEDIATRIC.glob("images/*.png"))[:4]
    target = tmp_path / "labels.csv"
    save_labels(target, {str(images[0]): "opacity", str(images[1]): "opacity"})
    save_labels(target, {str(images[1]): "clear", str(images[2]): "clear"}, {str(images[2]): "p7"})
    with open(target, newline="") as fh:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(fh)}
    assert {k: v["label"] for k, v in rows.items()} == {images[0].name: "opacity", images[1].name: "clear",
                                                        images[2].name: "clear"}
    assert rows[images[2].name]["patient"] == "p7"
    found = discover(target)
    assert sorted(s.label for s in found.samples) == ["clear", "clear", "opacity"]
    with pytest.raises(ConfigError, match="a label cannot be empty"):
        save_labels(target, {str(images[3]): " "})
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(MimError, match="not a labels manifest"):
        save_labels(tmp_path / "other.csv", {str(images[3]): "a"})
    assert (tmp_path / "other.csv").read_text() == "x,y\n1,2\n", "nothing lost"
