"""The visual-token (BEiT) and teacher-feature (data2vec) methods: tokenizer, learning, resume, pictures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _mim_tiny import SAMPLE, tiny

from mim_workbench.errors import CheckpointError, ConfigError
from mim_workbench.masking import make_mask
from mim_workbench.models import ModelConfig, build_model
from mim_workbench.models.checkpoint import load_checkpoint
from mim_workbench.models.tokenizer import PatchTokenizer
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.metrics_log import read_metrics
from mim_workbench.training.pretrain_loop import pretrain
from mim_workbench.training.targets import fit_targets, targets_cache_path

H, W = 32, 48            # non-square: a 4 x 6 grid of 8 px patches
ARCH = dict(img_size=(H, W), patch_size=8, embed_dim=32, depth=2, num_heads=2, codebook_size=16)
#: a tiny run on the sample X-rays: 64 px, 16 px patches, 176 training patches for 32 tokens
RUN = {"model_options": {"codebook_size": 32}}


def _images(n: int, chans: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a few blobs): patches with structure, as X-rays have."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, chans, H // 8, W // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


def _model(method: str, chans: int = 1):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(dict(method=method, in_chans=chans, **ARCH)))
    if model.needs_fitting:
        model.fit(_images(16, chans), seed=0)
    return model


# --------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic_from_its_seed_and_draws_token_maps():
    images = _images(12)
    a, b, c = (PatchTokenizer(16, 8, 1) for _ in range(3))
    a.fit(images, seed=3)
    b.fit(images, seed=3)
    c.fit(images, seed=4)
    assert bool(a.fitted) and torch.equal(a.centroids, b.centroids) and torch.equal(a.pictures, b.pictures)
    assert not torch.equal(a.centroids, c.centroids)
    tokens = a.tokens(images[:2])
    assert tokens.shape == (2, 24) and tokens.dtype == torch.long and int(tokens.max()) < 16
    assert a.draw(tokens, (4, 6)).shape == (2, 1, H, W)
    with pytest.raises(ValueError, match="cannot make 16 tokens"):
        PatchTokenizer(16, 8, 1).fit(images[:0], seed=0)


def test_the_fit_is_cached_by_data_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_WORKBENCH_CACHE", str(tmp_path))
    dataset = [{"image": im} for im in _images(10)]
    first = _model_unfitted()
    note = fit_targets(first, dataset, seed=0, signature="data-a")
    assert "fitted on 10 training images" in note
    second = _model_unfitted()
    assert "read from the cache" in fit_targets(second, dataset, seed=0, signature="data-a")
    assert torch.equal(first.tokenizer.centroids, second.tokenizer.centroids)
    other = _model_unfitted()
    assert "fitted" in fit_targets(other, dataset, seed=0, signature="data-b")   # other data: fitted anew
    settings_a = {"seed": 0}
    assert targets_cache_path("x", settings_a) != targets_cache_path("x", {"seed": 1})
    assert fit_targets(_model("feature"), dataset, seed=0, signature="data-a") is None
    too_big = build_model(ModelConfig.from_dict(dict(method="beit", **{**ARCH, "codebook_size": 512})))
    with pytest.raises(ConfigError, match="codebook_size=512.*240 patches"):
        fit_targets(too_big, dataset, seed=0, signature="data-c")


def _model_unfitted():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(dict(method="beit", **ARCH)))


# --------------------------------------------------------------------- masking
def test_blockwise_masks_hide_the_same_count_in_blocks_and_repeat_from_a_seed():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = make_mask("blockwise", 8, (14, 14), 0.4, generator=g1)
    b = make_mask("blockwise", 8, (14, 14), 0.4, generator=g2)
    assert torch.equal(a, b) and (a.sum(1) == round(0.4 * 196)).all()
    grid = a.view(8, 14, 14).float()
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert float(((neighbours > 0) & (grid > 0)).sum() / grid.sum()) > 0.9
    assert (make_mask("blockwise", 2, (3, 5), 0.6, generator=g1).sum(1) == 9).all()


# --------------------------------------------------------------------- learning
@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("method", ["beit", "feature"])
def test_each_method_overfits_one_batch(method, chans):
    model = _model(method, chans)
    x = _images(8, chans, seed=1)
    mask = model.make_mask("blockwise", 8, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for step in range(60):
        out = model(x, mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_step(step + 1, 60)
        first = float(out.loss.detach()) if first is None else first
    assert float(out.loss.detach()) < 0.5 * first
    if method == "beit":
        assert float(out.losses["token_acc"]) > float(out.losses["token_base"]) + 0.2
    else:
        assert float(out.losses["target_std"]) > 0.05, "the teacher's targets collapsed"
    r = model.render(out, x)
    assert r.masked.shape == (8, chans, H, W)
    if method == "beit":
        assert r.tokens.shape == r.tokens_pred.shape == (8, chans, H, W)
    else:
        assert r.similarity.shape == (8, 1, H, W) and r.reconstruction is r.masked


def test_the_teacher_follows_the_student_with_its_momentum():
    model = _model("feature")
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), model.encoder.parameters()))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.momentum(0, 100) == pytest.approx(0.999) and model.momentum(100, 100) == pytest.approx(0.9999)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.after_step(0, 100)
    moved = [float((t - b).abs().max()) for t, b in zip(model.teacher.parameters(), before)]
    assert all(m == pytest.approx(1e-3, rel=1e-2) for m in moved)
    model.train()
    assert model.training and not model.teacher.training


@pytest.mark.parametrize("method", ["beit", "feature"])
def test_pretrain_logs_its_step_metric_and_resumes_exactly(tmp_path, method):
    common = dict(method=method, epochs=3, augment=True, **RUN)
    straight = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "a", max_steps=6, **common)))
    first = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "b", max_steps=4, **common)))
    second = pretrain(PretrainConfig(resume=str(tmp_path / "b"), max_steps=6))
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in first.history + second.history]
    wa, wb = load_checkpoint(tmp_path / "a").model_state(), load_checkpoint(tmp_path / "b").model_state()
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    column = "token_acc" if method == "beit" else "target_std"
    rows = read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r[column]) for r in rows)
    assert any(k.startswith("tokenizer.") for k in wa) == (method == "beit")
    assert any(k.startswith("teacher.") for k in wa) == (method == "feature")


def test_a_codebook_left_to_the_data_fits_a_dozen_images_and_resumes(tmp_path):
    # 11 training images of 16 patches: 176 patches fit 16 tokens of 8+ patches, not 512
    events: list = []
    first = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", method="beit", epochs=3, max_steps=2)),
                     on_event=events.append)
    notes = next(e.notes for e in events if type(e).__name__ == "Started")
    assert first.step == 2 and any("16 visual tokens instead of 512" in n for n in notes), notes
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_options"] == {"codebook_size": 16}
    second = pretrain(PretrainConfig(resume=str(tmp_path / "run"), max_steps=3))
    assert second.step == 3   # the same 16-token model was rebuilt
    # a size the user gives is kept (below: 32 tokens) or refused when too big (above)


# --------------------------------------------------------------------- checkpoints and pictures
def test_beit_checkpoint_carries_its_tokenizer_and_refuses_a_broken_one(tmp_path):
    from safetensors.torch import load_file, save_file

    from mim_workbench.inference.reconstruct import model_from_checkpoint, reconstruct

    run = tmp_path / "run"
    pretrain(PretrainConfig.from_dict(tiny(run, method="beit", max_steps=2, **RUN)))
    model, _ = model_from_checkpoint(run)        # no data needed: the tokenizer is in the weights
    assert bool(model.tokenizer.fitted) and model.tokenizer.codebook_size == 32
    res = reconstruct(run, SAMPLE / "images" / "cxr0000.png", seed=0)
    assert 0.0 <= res.metrics["token_acc"] <= 1.0 and res.tokens.shape == res.tokens_pred.shape == res.image.shape
    paths = {p.name for p in res.save(tmp_path / "pics")}
    assert {"tokens.png", "tokens_pred.png", "metrics.json"} <= paths
    assert "token_acc" in json.loads((tmp_path / "pics" / "metrics.json").read_text())

    ckpt = load_checkpoint(run).path
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    target = load_checkpoint(broken).path / "model.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("tokenizer.")}, str(target))
    with pytest.raises(CheckpointError, match="BEiT tokenizer is missing"):
        model_from_checkpoint(broken)
    save_file({**state, "tokenizer.centroids": torch.full_like(state["tokenizer.centroids"], float("nan"))},
              str(target))
    with pytest.raises(CheckpointError, match="BEiT tokenizer is corrupt"):
        model_from_checkpoint(broken)


def test_feature_reconstruct_draws_the_cosine_map_and_exports_the_student(tmp_path):
    from safetensors.torch import load_file

    from mim_workbench.inference.reconstruct import reconstruct
    from mim_workbench.models import export_encoder
    from mim_workbench.inference.reconstruct import model_from_checkpoint

    run = tmp_path / "run"
    pretrain(PretrainConfig.from_dict(tiny(run, method="feature", max_steps=2)))
    res = reconstruct(run, SAMPLE / "images" / "cxr0000.png", seed=0)
    assert -1.0 <= res.metrics["cosine_masked"] <= 1.0 and "psnr" not in res.metrics
    assert res.similarity.shape == res.image.shape
    assert "similarity.png" in {p.name for p in res.save(tmp_path / "pics")}
    model, _ = model_from_checkpoint(run)
    export_encoder(model, tmp_path / "enc.safetensors")
    exported = load_file(str(tmp_path / "enc.safetensors"))
    student = model.encoder.state_dict()
    assert set(exported) == set(student) and all(torch.equal(exported[k], student[k]) for k in student)
