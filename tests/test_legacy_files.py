"""Run folders written by an earlier release keep working: their settings files parse, their
checkpoints load, reconstruct, fine-tune and predict.

``tests/data/legacy`` holds a tiny pretraining run (MAE, 64 px, 32-wide, 1 block, 2 steps)
and a linear probe on it, exactly as the workbench wrote them (flat settings files, absolute
paths of the machine that wrote them); see its README.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from mim_workbench.training import PretrainConfig

LEGACY = Path(__file__).parent / "data" / "legacy"


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(LEGACY / name, dst)
    return dst


def test_legacy_pretrain_settings_file_parses_to_the_same_run():
    values = json.loads((LEGACY / "pretrain" / "config.json").read_text())
    cfg = PretrainConfig.from_file(LEGACY / "pretrain" / "config.json")
    assert cfg.method == "mae" and cfg.strategy == "random" and cfg.ratio == 0.75
    assert cfg.encoder.embed_dim == values["embed_dim"] == 32 and cfg.encoder.depth == 1 and cfg.encoder.img_size == (64, 64)
    assert cfg.decoder_embed_dim == 16 and cfg.batch_size == 4 and cfg.max_steps == 2


def test_legacy_finetune_settings_file_parses():
    from mim_workbench.training.config import saved_finetune_values
    from mim_workbench.training.finetune import FinetuneConfig

    values = json.loads((LEGACY / "finetune" / "config.json").read_text())
    cfg = FinetuneConfig.from_dict(saved_finetune_values(values))
    assert cfg.mode == "probe" and cfg.epochs == 1 and cfg.lr == 0.001
    assert "pool" not in values and cfg.pool == "token"   # probes of that version used the class token


def test_legacy_pretrain_checkpoint_reconstructs(tmp_path, sample_root):
    from mim_workbench.inference.reconstruct import model_from_checkpoint, reconstruct
    from mim_workbench.io import read_image

    run = _copy(tmp_path, "pretrain")
    model, _ = model_from_checkpoint(run / "ckpt-2")
    assert sum(p.numel() for p in model.parameters()) > 0
    image = read_image(sample_root / "images" / "cxr0000.png")
    result = reconstruct(run / "ckpt-2", image, seed=0)
    assert np.isfinite(result.reconstruction).all() and result.reconstruction.shape == result.mask.shape


def test_legacy_pretrain_checkpoint_fine_tunes_and_its_probe_predicts(tmp_path, sample_root, one_thread):
    from mim_workbench.inference.predict import load_predictor, predict
    from mim_workbench.io import read_image
    from mim_workbench.training.finetune import FinetuneConfig, finetune

    run = _copy(tmp_path, "pretrain")
    res = finetune(FinetuneConfig(data=str(sample_root), out=str(tmp_path / "probe"), checkpoint=str(run / "ckpt-2"),
                                  mode="probe", epochs=1, device="cpu", threads=1))
    assert res.reason == "completed"
    old_probe = _copy(tmp_path, "finetune")
    image = read_image(sample_root / "images" / "cxr0058.png")
    for ckpt, pool in ((res.checkpoint, "avg"), (old_probe / "ckpt-1", "token")):
        pred = predict(ckpt, image)
        probs = np.asarray(pred.probs)
        assert probs.shape == (2,) and abs(float(probs.sum()) - 1.0) < 1e-5
        assert load_predictor(ckpt).model.pool == pool   # rebuilt on the feature it was trained on
    assert torch.get_num_threads() == 1


def test_fine_tuning_stopped_by_a_flat_settings_version_resumes(tmp_path, monkeypatch, sample_root):
    from mim_workbench.training.config import saved_finetune_values
    from mim_workbench.training.finetune import FinetuneConfig, finetune

    # The stopped run names its data and folder relatively: rebuild that layout here.
    (tmp_path / "sample_data").symlink_to(sample_root, target_is_directory=True)
    shutil.copytree(LEGACY / "finetune-stopped", tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    values = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "embed_dim" in values and "encoder" not in values      # written in the flat spelling
    cfg = FinetuneConfig.from_dict(saved_finetune_values({**values, "resume": True, "max_steps": None}))
    assert cfg.encoder.embed_dim == 32 and cfg.img_size == (64, 64)
    res = finetune(cfg)
    assert res.reason == "completed" and any("resumed at epoch 3" in n for n in res.notes)
