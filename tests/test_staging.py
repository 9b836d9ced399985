"""Staging viewer-only inputs (layers, painted strokes) into a run folder, and runner tasks."""

from __future__ import annotations

import numpy as np
import pytest

from mim_workbench.errors import ConfigError
from mim_workbench.io.datasets import discover
from mim_workbench.io.staging import StagedImage, safe_stem, stage_labelled, stage_strokes
from mim_workbench.training.tasks import DenseJob, run_task


def test_safe_stem_never_leaves_the_folder():
    assert safe_stem("../../etc/passwd") == "etc_passwd"
    assert safe_stem("region: a/b") == "region_a_b"
    assert safe_stem("...") == "image"


def test_stage_labelled_writes_a_manifest_discover_reads(tmp_path, sample_root):
    src = sample_root / "images" / "cxr0000.png"
    rng = np.random.default_rng(0)
    items = [StagedImage("cxr0000", None, source=str(src), label="a"),
             StagedImage("mem", rng.random((32, 40), dtype=np.float32), label="b"),
             StagedImage("mem", rng.random((32, 40), dtype=np.float32), label="b"),  # same name twice
             StagedImage("unlabelled", rng.random((8, 8), dtype=np.float32))]
    manifest = stage_labelled(items, tmp_path / "inputs")
    index = discover(manifest)
    assert sorted(s.id for s in index.samples) == ["cxr0000", "mem", "mem_1"]
    assert {s.id: s.label for s in index.samples} == {"cxr0000": "a", "mem": "b", "mem_1": "b"}
    assert next(s for s in index.samples if s.id == "cxr0000").image == src, "files are referenced, not copied"
    assert np.array_equal(np.load(tmp_path / "inputs" / "mem.npy"), items[1].data)


def test_stage_labelled_needs_two_classes(tmp_path):
    items = [StagedImage("x", np.zeros((8, 8), np.float32), label="a")]
    with pytest.raises(ConfigError, match="at least two classes.*layers: x"):
        stage_labelled(items, tmp_path)


def test_stage_strokes_keeps_labels_and_rejects_bad_shapes(tmp_path):
    img = np.zeros((20, 30), np.float32)
    s = np.zeros((20, 30), np.uint8)
    s[2, 3], s[10, 20] = 1, 2
    images, strokes = stage_strokes([StagedImage("a", img, strokes=s),
                                     StagedImage("empty", img, strokes=np.zeros_like(s)),
                                     StagedImage("none", img)], tmp_path)
    assert len(images) == len(strokes) == 1
    assert np.array_equal(np.load(strokes[0]), s)
    with pytest.raises(ConfigError, match="no painted strokes"):
        stage_strokes([StagedImage("empty", img, strokes=np.zeros_like(s))], tmp_path)
    with pytest.raises(ConfigError, match="strokes of 'a' have shape"):
        stage_strokes([StagedImage("a", img, strokes=np.zeros((5, 5), np.uint8))], tmp_path)


def test_dense_job_runs_from_a_dict(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.random((64, 64), dtype=np.float32)
    img[:, 32:] += 1.0
    s = np.zeros((64, 64), np.uint8)
    s[10:50:4, 5:25:4] = 1
    s[10:50:4, 40:60:4] = 2
    images, strokes = stage_strokes([StagedImage("a", img, strokes=s)], tmp_path / "inputs")
    model = {"img_size": [32, 32], "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    job = DenseJob(images=images, strokes=strokes, out=str(tmp_path / "run"), model=model,
                   config={"classes": ["dark", "bright"], "steps": 5, "device": "cpu", "threads": 1})
    events = []
    head = run_task("dense", job.to_dict(), on_event=events.append)
    assert head.classes == ["dark", "bright"]
    assert (tmp_path / "run" / "job.json").is_file()
    assert type(events[-1]).__name__ == "Finished" and events[-1].last_checkpoint
    with pytest.raises(ConfigError, match="unknown dense job setting"):
        DenseJob.from_dict({**job.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="task='nope'"):
        run_task("nope", {})
