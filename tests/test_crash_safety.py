"""SIGKILL during pretraining and during mask autosave loses nothing that was committed.

A pretraining process is killed (``MIM_FAULT_INJECT``, see ``mim_workbench/faults.py``)
at every point of the checkpoint writer - after each file, before the rename, after
the rename, after ``latest`` moved - at two different checkpoints, plus at random
moments from outside, plus once through the real ``mim-workbench pretrain`` command.
Each time the newest committed checkpoint loads, the run resumes from it, and the
resumed run ends with exactly the weights of a run that was never killed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _crash_child import autosave_forever, pretrain_until_killed
from _mim_tiny import tiny, tiny_cli_flags

from mim_workbench.models import checkpoint as ck
from mim_workbench.training.config import PretrainConfig
from mim_workbench.training.pretrain_loop import pretrain

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6
# Checkpoints every 2 steps (2, 4, 6); keep 2 so pruning is exercised too.  One thread:
# the machine running the suite is often busy, and spinning OpenMP threads then cost most.
RUN = dict(epochs=4, max_steps=MAX_STEPS, checkpoint_every=2, keep_checkpoints=2, augment=True, threads=1)
# Kill point -> does the checkpoint being written count once the process dies there?
CKPT_POINTS = {
    "ckpt-after-model": False, "ckpt-after-optim": False, "ckpt-after-meta": False,
    "ckpt-before-rename": False, "ckpt-after-rename": False, "ckpt-after-latest": True,
}


@pytest.fixture(scope="module")
def ctx():
    # One interpreter imports torch once; each child is a fork of it (~0.1 s, not ~4 s).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "_crash_child", "mim_workbench.training.pretrain_loop"])
    return context


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    pretrain(PretrainConfig.from_dict(tiny(out, **RUN)))
    return ck.load_checkpoint(out).model_state()


def _join_killed(proc, timeout: float = 60.0) -> None:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the child was not killed at its fault point")
    assert proc.exitcode == -signal.SIGKILL, f"child exited with {proc.exitcode}, expected SIGKILL"


def _resume_and_compare(run: Path, expected_step: int | None, reference: dict[str, torch.Tensor]) -> int:
    """The committed checkpoint loads; resuming from it ends on the reference weights."""
    latest = ck.load_checkpoint(run)
    assert latest.path == ck.read_latest(run)                 # the one ``latest`` names...
    assert (latest.path / ck.META_FILE).is_file() and latest.optimizer_state() is not None
    if expected_step is not None:
        assert latest.step == expected_step
    result = pretrain(PretrainConfig(resume=str(run), max_steps=MAX_STEPS))
    assert result.step == MAX_STEPS
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]   # crash leftovers cleaned
    final = ck.load_checkpoint(run).model_state()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    return latest.step


@pytest.mark.parametrize("occurrence", [2, 3])
@pytest.mark.parametrize("point", list(CKPT_POINTS))
def test_sigkill_at_each_checkpoint_write_point(ctx, reference, tmp_path, point, occurrence):
    run = tmp_path / "run"
    proc = ctx.Process(target=pretrain_until_killed, args=(tiny(run, **RUN), f"{point}:{occurrence}"))
    proc.start()
    _join_killed(proc)
    saving = 2 * occurrence                      # the step whose checkpoint was being written
    committed = saving if CKPT_POINTS[point] else saving - 2
    if point in ("ckpt-after-model", "ckpt-after-optim", "ckpt-after-meta", "ckpt-before-rename"):
        assert [p for p in run.iterdir() if p.name.startswith(".tmp-ckpt-")]   # died mid-write
        assert not (run / f"ckpt-{saving}").exists()
    _resume_and_compare(run, committed, reference)


def test_sigkill_at_random_moments(ctx, reference, tmp_path):
    rng = random.Random(8)
    steps = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        progress = ctx.Queue()
        cfg = tiny(run, **{**RUN, "checkpoint_every": 1, "keep_checkpoints": 2})
        # 0.06 s after each step: the 5 steps left after the first checkpoint take > 0.3 s,
        # so a kill within 0.25 s always lands mid-run, whatever the machine's speed.
        proc = ctx.Process(target=pretrain_until_killed, args=(cfg, None, progress, 0.06))
        proc.start()
        try:
            progress.get(timeout=60)   # a first checkpoint exists before the kill
        except queue.Empty:
            proc.kill()
            pytest.fail("no checkpoint written")
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        steps.append(_resume_and_compare(run, None, reference))
    assert all(1 <= s < MAX_STEPS for s in steps)


def test_sigkill_of_the_cli_pretrain_command(reference, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "MIM_FAULT_INJECT": "ckpt-before-rename:3", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mim_workbench.cli", "pretrain", "--data", str(REPO / "sample_data" / "images"),
           "--masks", str(REPO / "sample_data" / "masks"), "--out", str(run), *tiny_cli_flags(),
           "--epochs", "4", "--max-steps", str(MAX_STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "2",
           "--seed", "0", "--threads", "1", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _resume_and_compare(run, 4, reference)


def test_autosaved_mask_survives_a_killed_viewer(ctx, tmp_path):
    from mim_workbench_napari import _autosave as autosave

    shape = (48, 40)
    kills = 0
    for fault in ("mask-before-rename:3", None, None):
        cache = tmp_path / f"cache{kills}"
        progress = ctx.Queue()
        proc = ctx.Process(target=autosave_forever, args=(str(cache), "scan.dcm", shape, fault, progress))
        proc.start()
        if fault is None:   # kill from outside, in the middle of the stream of saves
            assert progress.get(timeout=60) >= 1
            time.sleep(random.Random(kills).uniform(0.01, 0.2))
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL
        kills += 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MIM_WORKBENCH_CACHE", str(cache))
            mask = autosave.load_autosave("scan.dcm", shape)
        assert mask is not None and mask.shape == shape
        values = np.unique(mask)
        assert len(values) == 1 and values[0] >= 1          # one complete version, never a torn one
        if fault is not None:
            assert values[0] == 2                          # the save before the killed one
            assert any(p.name.startswith(".") for p in (cache / "autosave").iterdir())   # torn temp file ignored
