"""A stopped or crashed fine-tuning run continues from its last finished epoch, exactly."""

from __future__ import annotations

import json

import pytest
import torch
from _mim_tiny import SAMPLE

from mim_workbench.cli import main
from mim_workbench.errors import CheckpointError, ConfigError
from mim_workbench.models.checkpoint import load_checkpoint
from mim_workbench.training.finetune import FinetuneConfig, finetune
from mim_workbench.training.finetune_state import STATE_FILE

# Full fine-tuning: drop-path, augmentation and the lr schedule all depend on where the run is.
FULL = dict(data=str(SAMPLE), checkpoint="scratch", mode="full", epochs=4, batch_size=2, threads=1, patience=0,
            img_size=64, embed_dim=64, depth=2, num_heads=2, seed=3, checkpoint_interval_s=0)


class _StopAt:
    """Asks to stop at the ``n``-th poll (the loop polls once per step)."""

    def __init__(self, n: int) -> None:
        self.n, self.polls = n, 0

    def stop_requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.n

    def pause_requested(self) -> bool:
        return False


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir).model_state()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    res = finetune(FinetuneConfig.from_dict(dict(out=str(out), **FULL)))
    assert res.reason == "completed" and not (out / STATE_FILE).exists(), "a finished plan leaves nothing to resume"
    return res, out


def _assert_same_run(res, out, ref, ref_out) -> None:
    assert [h["step"] for h in res.history] == [h["step"] for h in ref.history]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in res.history]),
                               torch.tensor([h["loss"] for h in ref.history]), rtol=1e-6, atol=1e-7)
    assert res.best_epoch == ref.best_epoch and res.metrics["accuracy"] == ref.metrics["accuracy"]
    a, b = _weights(out), _weights(ref_out)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_run_stopped_by_max_steps_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    ref, ref_out = uninterrupted
    spe = ref.history[0]["step"]
    first = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), **{**FULL, "max_steps": 2 * spe})))
    assert first.reason == "max_steps" and (tmp_path / STATE_FILE).is_file()
    res = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **FULL)))
    assert res.reason == "completed" and not (tmp_path / STATE_FILE).exists()
    assert any("resumed at epoch 3" in n for n in res.notes)
    _assert_same_run(res, tmp_path, ref, ref_out)
    assert [p.name for p in tmp_path.glob("ckpt-*")] == [f"ckpt-{res.history[res.best_epoch]['step']}"], \
        "the stopped run's model is superseded"


def test_run_stopped_mid_epoch_redoes_that_epoch_from_its_start(uninterrupted, tmp_path):
    ref, ref_out = uninterrupted
    spe = ref.history[0]["step"]
    first = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), **FULL)), control=_StopAt(spe + 2))   # inside epoch 2
    assert first.reason == "stopped" and len(first.history) == 1
    res = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **FULL)))
    _assert_same_run(res, tmp_path, ref, ref_out)


def test_resume_refuses_changed_settings_data_or_nothing_to_continue(uninterrupted, tmp_path):
    ref, ref_out = uninterrupted
    with pytest.raises(ConfigError, match="does not exist: this run has no epoch to continue"):
        finetune(FinetuneConfig.from_dict(dict(out=str(ref_out), resume=True, **FULL)))
    finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), **{**FULL, "max_steps": ref.history[0]["step"]})))
    with pytest.raises(ConfigError, match=r"other settings \(lr=.* -> 0\.01\)"):
        finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **{**FULL, "lr": 0.01})))
    with pytest.raises(ConfigError, match="max_steps=1: raise or unset it"):
        finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **{**FULL, "max_steps": 1})))
    with pytest.raises(ConfigError, match="already holds a run"):
        finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), **FULL)))
    (tmp_path / STATE_FILE).write_bytes(b"not a state file")
    with pytest.raises(CheckpointError, match=r"resume: cannot read .*resume\.safetensors"):
        finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **FULL)))


def test_cli_resume_continues_with_the_runs_own_settings(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--data", str(SAMPLE), "--checkpoint", "scratch", "--mode", "full", "--epochs", "3",
             "--batch-size", "2", "--threads", "1", "--img-size", "64", "--embed-dim", "64", "--depth", "2",
             "--num-heads", "2", "--quiet"]
    assert main(["finetune", "--out", str(out), "--max-steps", "5", *flags]) == 0     # 4 steps per epoch
    assert (out / STATE_FILE).is_file()
    capsys.readouterr()
    assert main(["finetune", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(out), "--threads", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["checkpoint"] and not (out / STATE_FILE).exists()
    meta = load_checkpoint(out).meta
    assert meta["config"]["epochs"] == 3 and meta["config"]["mode"] == "full"
    assert main(["finetune", "--out", str(tmp_path / "x")]) == 2
    assert "finetune needs --checkpoint, --data" in capsys.readouterr().err


def test_probe_resumes_exactly_and_keeps_its_frozen_encoder_out_of_the_state(tmp_path):
    probe = {**FULL, "mode": "probe", "epochs": 3, "batch_size": 2}
    ref = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "whole"), **probe)))
    spe = ref.history[0]["step"]
    finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "part"), **{**probe, "max_steps": spe})))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "part" / STATE_FILE), framework="pt") as fh:
        model_keys = [k for k in fh.keys() if k.startswith("model.")]
    assert model_keys and not any(k.startswith("model.encoder.") for k in model_keys)
    res = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path / "part"), resume=True, **probe)))
    _assert_same_run(res, tmp_path / "part", ref, tmp_path / "whole")


def test_state_is_written_at_the_first_epoch_end_then_at_most_every_interval(uninterrupted, tmp_path):
    from safetensors import safe_open

    ref, _ = uninterrupted
    spe = ref.history[0]["step"]
    finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), **{**FULL, "max_steps": 3 * spe, "checkpoint_interval_s": 3600})))
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as fh:
        saved = json.loads(fh.metadata()["state"])
    assert saved["loop"]["epoch"] == 1, "epochs 2 and 3 fell within the interval"
    res = finetune(FinetuneConfig.from_dict(dict(out=str(tmp_path), resume=True, **FULL)))   # the interval may change
    assert any("resumed at epoch 2" in n for n in res.notes)
