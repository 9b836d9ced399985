"""``pretrain`` under torchrun (2 CPU processes, gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from _mim_tiny import REPO, tiny

from mim_workbench.models.checkpoint import load_checkpoint
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain


def _torchrun_pretrain(settings: dict, out) -> None:
    """``pretrain(settings)`` on 2 CPU processes (tests/_ddp_pretrain.py), writing ``out``."""
    cfg_file = out.parent / f"{out.name}.json"
    cfg_file.write_text(json.dumps({**settings, "out": str(out)}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "_ddp_pretrain.py"), str(cfg_file)],
        capture_output=True, text=True, env=env, timeout=180, cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_process_torchrun_matches_single_process(tmp_path):
    # Region-guided masking exercises the gather of the batch's regions across ranks; 3 steps
    # close epoch 0 (11 training images, batch 4): validation and the epoch checkpoint
    # decision run on both processes.
    settings = tiny(strategy="region", epochs=2, max_steps=3, threads=1, blr=1.5e-4, checkpoint_interval_s=0)
    _torchrun_pretrain(settings, tmp_path / "ddp")
    ddp_losses = json.loads((tmp_path / "ddp" / "losses.json").read_text())

    single = pretrain(PretrainConfig.from_dict({**settings, "out": str(tmp_path / "one")}))
    one_losses = [row["loss"] for row in single.history]
    assert len(ddp_losses) == len(one_losses) == 3
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(one_losses), rtol=0, atol=1e-5)

    a = load_checkpoint(tmp_path / "ddp")
    b = load_checkpoint(tmp_path / "one")
    assert a.step == b.step == 3 and a.meta["world_size"] == 2 and b.meta["world_size"] == 1
    wa, wb = a.model_state(), b.model_state()
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
    # Only rank 0 wrote: one metrics file, checkpoints of the global step count.
    assert [p.name for p in (tmp_path / "ddp").glob("ckpt-*")] == ["ckpt-3"]
    assert a.meta["metrics"]["val_loss"] == pytest.approx(b.meta["metrics"]["val_loss"], abs=1e-5)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("method", ["beit", "feature"])
def test_token_and_feature_methods_under_torchrun_match_single_process(tmp_path, method):
    """BEiT's tokenizer (fitted on every rank) and the feature method's teacher (moved on every
    rank after the same all-reduced step) stay the same as on one process."""
    # the learning rate of the test above: at BEiT's own, Adam turns the key biases' rounding-level
    # gradients (attention ignores them) into steps that differ by 2e-5 between the two reductions
    settings = tiny(method=method, epochs=2, max_steps=3, threads=1, blr=1.5e-4, checkpoint_interval_s=0,
                    model_options={"codebook_size": 32})
    _torchrun_pretrain(settings, tmp_path / "ddp")
    ddp_losses = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    single = pretrain(PretrainConfig.from_dict({**settings, "out": str(tmp_path / "one")}))
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor([r["loss"] for r in single.history]),
                               rtol=0, atol=1e-5)
    wa, wb = load_checkpoint(tmp_path / "ddp").model_state(), load_checkpoint(tmp_path / "one").model_state()
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_cli_pretrain_under_torchrun_exits_cleanly_on_every_rank(tmp_path):
    """`torchrun -m mim_workbench.cli pretrain` — the README's command — succeeds on all ranks."""
    import subprocess
    import sys

    from _mim_tiny import SAMPLE, tiny_cli_flags

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mim_workbench.cli",
         "pretrain", "--data", str(SAMPLE), "--out", str(out), "--max-steps", "2", "--quiet", *tiny_cli_flags()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "latest").is_file() and (out / "ckpt-2" / "model.safetensors").is_file()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_unreadable_files_met_by_any_rank_are_recorded(tmp_path):
    """A file that fails to decode on rank 1 is named in rank 0's record, as on one process."""
    import shutil

    from _bad_corpus import load_corpus
    from _mim_tiny import SAMPLE_IMAGES

    data = tmp_path / "data"
    data.mkdir()
    for src in sorted(SAMPLE_IMAGES.glob("*.png"))[:6]:
        shutil.copy(src, data / src.name)
    # Half the files are broken; one epoch draws all 12, 6 per rank: rank 1 meets some.
    bad = [f"broken{i}.dcm" for i in range(6)]
    for name in bad:
        (data / name).write_bytes(load_corpus().dicom_bytes(None))
    settings = tiny(data=str(data), masks=None, strategy="random", epochs=1, batch_size=4, threads=1,
                    val_fraction=0.0, checkpoint_interval_s=0)
    _torchrun_pretrain(settings, tmp_path / "ddp")
    record = (tmp_path / "ddp" / "unreadable.txt").read_text().splitlines()
    assert sorted(name for name in bad if any(name in line for line in record)) == bad, record
    assert len(record) == len(bad), "each file is recorded once"
