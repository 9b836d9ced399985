"""Numerical and resource faults during pretraining: non-finite losses, out of memory,
a full disk while checkpointing, and a hostile or moved run directory on resume.

(Exact resume, N steps vs N/2 + stop + N/2, is ``test_training_loop.py::
test_exact_resume_matches_uninterrupted_run``; resume after SIGKILL is ``test_crash_safety.py``.)
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from _mim_tiny import tiny

from mim_workbench.errors import CheckpointError, CheckpointWriteError, ConfigError, TrainingError
from mim_workbench.models import checkpoint as ck
from mim_workbench.training import events as ev
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain


def _nan_after(monkeypatch, first_bad_call: int) -> None:
    """Every training forward from call ``first_bad_call`` on returns a NaN loss."""
    from mim_workbench.models.mae import MAEModel

    original = MAEModel.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = original(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= first_bad_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAEModel, "forward", forward)


def test_k_non_finite_steps_in_a_row_stop_the_run_with_a_message(tmp_path, monkeypatch):
    _nan_after(monkeypatch, 3)
    seen: list = []
    cfg = PretrainConfig.from_dict(tiny(tmp_path / "run", epochs=20, checkpoint_every=2, max_nonfinite_steps=4))
    with pytest.raises(TrainingError, match=r"not finite for 4 steps in a row \(steps 3-6") as info:
        pretrain(cfg, on_event=seen.append)
    assert "blr" in str(info.value) and "ckpt-4" in str(info.value)
    progress = [e for e in seen if isinstance(e, ev.Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6]        # every skipped step was reported
    assert all("skipped: non-finite" in p.message for p in progress[2:])
    failed = seen[-1]
    assert isinstance(failed, ev.Failed) and "in a row" in failed.message and failed.traceback is None
    # Skipped steps change nothing: the last checkpoint holds the last good (finite) weights.
    last = ck.load_checkpoint(tmp_path / "run")
    good = ck.load_checkpoint(tmp_path / "run" / "ckpt-2").model_state()
    assert last.step == 4 and all(torch.equal(v, good[k]) for k, v in last.model_state().items())
    assert all(torch.isfinite(v).all() for v in good.values())


def test_isolated_non_finite_steps_do_not_stop_the_run(tmp_path, monkeypatch):
    _nan_after(monkeypatch, 10_000)   # never: the counter must reset on good steps
    result = pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", epochs=1, max_nonfinite_steps=1)))
    assert result.reason == "completed" and result.skipped_steps == 0


def test_max_nonfinite_steps_is_validated():
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ConfigError, match="max_nonfinite_steps"):
            PretrainConfig(max_nonfinite_steps=bad)
    assert PretrainConfig(max_nonfinite_steps=0).max_nonfinite_steps == 0   # 0 = never stop


def test_out_of_memory_is_reported_with_a_suggestion(tmp_path, monkeypatch):
    from mim_workbench.models.mae import MAEModel

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(MAEModel, "forward", oom)
    seen: list = []
    with pytest.raises(ConfigError) as info:
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", epochs=1)), on_event=seen.append)
    message = str(info.value)
    assert "out of memory" in message and "batch_size=4" in message
    assert "lower the batch size" in message and "accum_steps" in message
    assert isinstance(seen[-1], ev.Failed) and seen[-1].message == message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from safetensors import torch as st

    real_save = st.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 3:  # 2 files per checkpoint: the second checkpoint's model file fails
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    run = tmp_path / "run"
    seen: list = []
    with pytest.raises(CheckpointWriteError) as info:
        pretrain(PretrainConfig.from_dict(tiny(run, epochs=5, checkpoint_every=2)), on_event=seen.append)
    message = str(info.value)
    assert str(run / "ckpt-4") in message and "No space left on device" in message
    assert f"previous checkpoint {run / 'ckpt-2'} is intact" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert isinstance(seen[-1], ev.Failed) and seen[-1].message == message
    assert seen[-1].last_checkpoint == str(run / "ckpt-2")
    # Nothing half-written is left, and the previous checkpoint still loads and resumes.
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("ckpt-", ".tmp"))) == ["ckpt-2"]
    monkeypatch.undo()
    assert ck.load_checkpoint(run).step == 2
    result = pretrain(PretrainConfig(resume=str(run), max_steps=4))
    assert result.step == 4 and ck.load_checkpoint(run).step == 4


def test_full_disk_on_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    def no_space(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    from safetensors import torch as st

    monkeypatch.setattr(st, "save_file", no_space)
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint"):
        pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", max_steps=1)))


def test_resume_writes_beside_the_checkpoint_not_where_its_config_says(tmp_path):
    """A shared or moved run directory: its stored ``out`` (here ``../escaped``) is ignored."""
    pretrain(PretrainConfig.from_dict(tiny(tmp_path / "orig", max_steps=2, epochs=3)))
    moved = tmp_path / "inbox" / "run"
    shutil.copytree(tmp_path / "orig", moved)
    shutil.rmtree(tmp_path / "orig")
    meta_path = ck.load_checkpoint(moved).path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["out"] = str(moved / ".." / ".." / "escaped")
    meta_path.write_text(json.dumps(meta))
    result = pretrain(PretrainConfig(resume=str(moved), max_steps=3))
    assert result.run_dir == str(moved) and ck.load_checkpoint(moved).step == 3
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "orig").exists()


def test_resume_from_a_checkpoint_with_a_bad_stored_config_names_the_key(tmp_path):
    pretrain(PretrainConfig.from_dict(tiny(tmp_path / "run", max_steps=1)))
    meta_path = ck.load_checkpoint(tmp_path / "run").path / "meta.json"
    for key, value, expect in (("batch_size", "4", "batch_size='4'"), ("evil_key", 1, "evil_key")):
        meta = json.loads(meta_path.read_text())
        meta["config"][key] = value
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=expect) as info:
            pretrain(PretrainConfig(resume=str(tmp_path / "run"), max_steps=2))
        assert str(meta_path) in str(info.value)
        meta["config"].pop(key)
        if key == "batch_size":
            meta["config"]["batch_size"] = 4
        meta_path.write_text(json.dumps(meta))


def test_a_tampered_latest_file_cannot_point_outside_the_run(tmp_path):
    """``latest`` holds a name, not a path: ``../elsewhere/ckpt-9`` is ignored, not followed."""
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    weights = {"w": torch.zeros(2)}
    ck.save_checkpoint(outside, 9, model_state=weights, optimizer_state=None, meta={"kind": "pretrain"})
    ck.save_checkpoint(run, 3, model_state=weights, optimizer_state=None, meta={"kind": "pretrain"})
    for name in ("../elsewhere/ckpt-9", str(outside / "ckpt-9"), "ckpt-9/../../elsewhere/ckpt-9"):
        (run / "latest").write_text(name + "\n")
        assert ck.read_latest(run) is None
        assert ck.load_checkpoint(run).path == run / "ckpt-3"
