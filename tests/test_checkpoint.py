"""Checkpoints: round trip, atomic writes, ``latest``, path resolution, clear errors, no pickle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mim_workbench.errors import CheckpointError
from mim_workbench.models import checkpoint as ck


def _model_and_optim(steps: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight], "weight_decay": 0.05},
                             {"params": [model[0].bias, model[1].weight, model[1].bias, model[2].bias],
                              "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        model(torch.randn(3, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run_dir: Path, step: int, model, opt, keep: int = 0, **meta) -> Path:
    return ck.save_checkpoint(run_dir, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                              meta={"kind": "pretrain", "epoch": 1, **meta}, keep=keep)


def test_round_trip_model_optimizer_and_meta(tmp_path):
    model, opt = _model_and_optim()
    path = _save(tmp_path, 7, model, opt, config={"seed": 1})
    assert path == tmp_path / "ckpt-7"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim.safetensors"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-7"

    c = ck.load_checkpoint(tmp_path, kind="pretrain")
    assert (c.kind, c.step, c.epoch, c.config) == ("pretrain", 7, 1, {"seed": 1})
    assert c.meta["schema_version"] == ck.SCHEMA_VERSION and "torch" in c.meta["versions"]
    for k, v in model.state_dict().items():
        assert torch.equal(c.model_state()[k], v)

    model2, _ = _model_and_optim(steps=0)
    model2.load_state_dict(c.model_state())
    opt2 = torch.optim.AdamW([{"params": [model2[0].weight, model2[2].weight]},
                              {"params": [model2[0].bias, model2[1].weight, model2[1].bias, model2[2].bias]}], lr=5.0)
    opt2.load_state_dict(c.optimizer_state())
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert b["param_groups"][0]["betas"] == (0.9, 0.95)
    for pid, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][pid][name])
    # Both optimisers continue identically.
    x = torch.randn(3, 6)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).square().mean().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("pick", ["dir", "model", "meta", "optim", "run", "latest"])
def test_load_by_any_path(tmp_path, pick):
    model, opt = _model_and_optim()
    d = _save(tmp_path / "run", 3, model, opt)
    path = {"dir": d, "model": d / "model.safetensors", "meta": d / "meta.json", "optim": d / "optim.safetensors",
            "run": d.parent, "latest": d.parent / "latest"}[pick]
    assert ck.load_checkpoint(path).path == d


def test_latest_names_newest_and_pruning_keeps_n(tmp_path):
    model, opt = _model_and_optim()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-3", "ckpt-4"]
    assert ck.load_checkpoint(tmp_path).step == 4
    # A stale `latest` (its directory gone) falls back to the newest complete checkpoint.
    (tmp_path / "latest").write_text("ckpt-99\n")
    assert ck.load_checkpoint(tmp_path).step == 4


def test_failed_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_optim()
    _save(tmp_path, 1, model, opt)

    def boom(path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "_fsync_dir", boom)   # fails after the files are written, before the rename
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1", "latest"]
    assert ck.load_checkpoint(tmp_path).step == 1


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt = _model_and_optim()
    _save(tmp_path, 5, model, opt, note="first")
    _save(tmp_path, 5, model, opt, note="second")
    assert ck.load_checkpoint(tmp_path).meta["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-5", "latest"]


def test_clear_errors(tmp_path):
    model, opt = _model_and_optim()
    d = _save(tmp_path / "run", 2, model, opt)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ck.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="expected 'finetune'"):
        ck.load_checkpoint(d, kind="finetune")

    (d / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="unreadable checkpoint metadata"):
        ck.load_checkpoint(d)
    (d / "meta.json").write_text(json.dumps({"kind": "pretrain", "step": 2, "schema_version": 999}))
    with pytest.raises(CheckpointError, match="schema version"):
        ck.load_checkpoint(d)
    (d / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not checkpoint metadata"):
        ck.load_checkpoint(d)

    d2 = _save(tmp_path / "run2", 2, model, opt)
    (d2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ck.load_checkpoint(d2)
    d3 = _save(tmp_path / "run3", 2, model, opt)
    (d3 / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read model weights"):
        ck.load_checkpoint(d3).model_state()
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ck.load_checkpoint(stray)


class _Custom:  # needs pickle code to load
    pass


def test_legacy_pth_only_through_weights_only(tmp_path):
    model, _ = _model_and_optim()
    good = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, good)
    c = ck.load_checkpoint(good)
    assert c.is_legacy and set(c.model_state()) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="--init"):
        ck.load_checkpoint(good, kind="pretrain")
    bad = tmp_path / "object.pth"
    torch.save({"model": _Custom()}, bad)
    with pytest.raises(CheckpointError, match="plain-tensor"):
        ck.load_checkpoint(bad).model_state()


def test_rng_state_round_trip_through_json():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = json.loads(json.dumps(ck.capture_rng_state(gen)))
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.rand(10), np.random.rand(10), random.random(), torch.rand(10, generator=gen)
    ck.restore_rng_state(state, gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    with pytest.raises(CheckpointError, match="RNG"):
        ck.restore_rng_state({"torch": "AAAA"}, gen)


def test_no_pickle_in_training_and_inference_code():
    root = Path(ck.__file__).resolve().parents[1]
    for sub in ("training", "inference"):
        for f in (root / sub).glob("*.py"):
            text = f.read_text(encoding="utf-8")
            assert "import pickle" not in text and "weights_only=False" not in text, f
