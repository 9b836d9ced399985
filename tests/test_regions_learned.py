"""Regions learned from a few examples: a small model trained on painted images proposes the
region on others, saves to a self-contained file that loads safely, and drives the folder
command and region-guided pretraining; bad examples and bad model files are named."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _mim_tiny import tiny
from PIL import Image

from mim_workbench.errors import ConfigError, MimError, ReaderError
from mim_workbench.io import read_image, read_mask
from mim_workbench.regions import dice
from mim_workbench.regions.examples import examples_from_data
from mim_workbench.regions.learned import RegionModel, RegionModelConfig, learn_regions

TRAIN = ("cxr0000", "cxr0058", "cxr0059", "cxr0124")


@pytest.fixture
def examples(tmp_path, sample_root) -> Path:
    root = tmp_path / "examples"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for name in TRAIN:
        shutil.copy(sample_root / "images" / f"{name}.png", root / "images" / f"{name}.png")
        shutil.copy(sample_root / "masks" / f"{name}.png", root / "masks" / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def lungs_model() -> RegionModel:
    """Learned from four sample X-rays, a fixed number of steps on one thread (deterministic)."""
    from mim_workbench.sample import sample_root

    root = sample_root()
    images = [read_image(root / "images" / f"{n}.png").data for n in TRAIN]
    masks = [read_mask(root / "masks" / f"{n}.png", shape=i.shape) for n, i in zip(TRAIN, images)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return learn_regions(images, masks, config=RegionModelConfig(name="lungs", parts=2), steps=150, seconds=None)
    finally:
        torch.set_num_threads(before)


def test_a_few_examples_teach_the_region_of_unseen_images(lungs_model, sample_root):
    scores = []
    for name in ("cxr0126", "cxr0155", "cxr0164", "cxr0170"):
        image = read_image(sample_root / "images" / f"{name}.png").data
        truth = read_mask(sample_root / "masks" / f"{name}.png", shape=image.shape)
        proposal = lungs_model.propose(image)
        assert proposal.shape == image.shape and proposal.dtype == np.uint8
        scores.append(dice(proposal, truth))
    everything = dice(np.ones_like(truth), truth)
    assert np.mean(scores) > everything + 0.2, (scores, everything)


def test_model_file_round_trip_is_self_contained(lungs_model, tmp_path, sample_root):
    path = lungs_model.save(tmp_path / "lungs.safetensors")
    assert path.stat().st_size < 1_000_000
    loaded = RegionModel.load(path)
    assert loaded.config == lungs_model.config and loaded.info["steps"] == 150
    image = read_image(sample_root / "images" / "cxr0176.png").data
    assert np.abs(loaded.probabilities(image) - lungs_model.probabilities(image)).max() < 0.02


def test_bad_model_files_are_named(tmp_path, lungs_model):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(pickle.dumps({"__reduce__": "os.system"}))
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    good = lungs_model.save(tmp_path / "good.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(good))
    state.pop(next(k for k in state if k.endswith("weight")))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    truncated = tmp_path / "missing-weights.safetensors"
    save_file(state, str(truncated), metadata=meta)
    for path in (corrupt, hostile, foreign, truncated, tmp_path / "absent.safetensors"):
        with pytest.raises(MimError, match=path.name):
            RegionModel.load(path)


def test_bad_examples_are_named(examples, tmp_path, sample_root):
    with pytest.raises(ConfigError, match="needs examples"):
        learn_regions([], [])
    no_masks = tmp_path / "plain"
    no_masks.mkdir()
    shutil.copy(sample_root / "images" / "cxr0000.png", no_masks / "cxr0000.png")
    with pytest.raises(ConfigError, match="no image has a mask"):
        examples_from_data(no_masks)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(examples / "masks" / "cxr0058.png")
    with pytest.raises(ConfigError, match="cxr0058.png: the mask is empty"):
        examples_from_data(examples)
    Image.fromarray(np.full((40, 90), 255, np.uint8)).save(examples / "masks" / "cxr0058.png")
    with pytest.raises(ReaderError, match="cxr0058.png.*aspect"):
        examples_from_data(examples)
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(examples / "masks" / "cxr0058.png")
    images, masks, _names = examples_from_data(examples)  # same aspect, other size: resampled
    assert all(m.shape == i.shape[:2] for i, m in zip(images, masks))


def test_cli_learn_then_propose_with_the_model(examples, tmp_path, sample_root):
    model = tmp_path / "lungs.safetensors"
    learn = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "regions", "learn", "--data", str(examples),
                            "--out", str(model), "--name", "lungs", "--parts", "2", "--steps", "20"],
                           capture_output=True, text=True, timeout=300)
    assert learn.returncode == 0, learn.stderr[-2000:]
    summary = json.loads(learn.stdout.splitlines()[-1])
    assert summary["examples"] == 4 and summary["steps"] == 20 and model.is_file()
    out = tmp_path / "masks"
    proc = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "regions", "propose", "--data",
                           str(sample_root / "images"), "--model", str(model), "--out", str(out), "--sheet", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 12 and len(list(out.glob("*.png"))) == 12
    manifest = json.loads((out / "regions.json").read_text())
    assert manifest["source"] == "model" and manifest["preset"] == "lungs"
    bad = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "regions", "propose", "--data",
                          str(sample_root / "images"), "--model", str(tmp_path / "nope.safetensors"), "--out",
                          str(tmp_path / "o2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_pretraining_with_a_learned_region_model(lungs_model, tmp_path, sample_root, one_thread):
    from mim_workbench.training import PretrainConfig, pretrain
    from mim_workbench.training.events import Started

    data = tmp_path / "xrays"
    data.mkdir()
    for p in sorted((sample_root / "images").glob("*.png"))[4:8]:
        shutil.copy(p, data / p.name)
    model = lungs_model.save(tmp_path / "lungs.safetensors")
    events: list = []
    result = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", data=str(data), masks=None, strategy="region",
                                            region_model=str(model), max_steps=2, val_fraction=0.0, threads=1)),
                      on_event=events.append)
    assert result.step == 2
    notes = next(e for e in events if isinstance(e, Started)).notes
    assert any("the model lungs.safetensors for 4 image(s)" in n for n in notes), notes
    with pytest.raises(ConfigError, match="not both"):
        PretrainConfig.from_dict(dict(data="x", out="y", strategy="region", region_preset="lungs", region_model=str(model)))
