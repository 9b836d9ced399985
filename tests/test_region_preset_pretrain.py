"""Region-guided pretraining on a folder without masks: ``--region-preset`` proposes the
missing masks once (cached for later runs), says how many and which look implausible, and
then trains; the Pretrain dock offers the same choice and shows the proposal's progress."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from _mim_tiny import tiny, tiny_cli_flags

from mim_workbench.errors import ConfigError
from mim_workbench.training import PretrainConfig, pretrain
from mim_workbench.training.events import Preparing, Started


@pytest.fixture
def unmasked(tmp_path, sample_root):
    folder = tmp_path / "xrays"
    folder.mkdir()
    for p in sorted((sample_root / "images").glob("*.png"))[:6]:
        shutil.copy(p, folder / p.name)
    return folder


def test_region_preset_proposes_once_then_reuses(unmasked, tmp_path, one_thread):
    events: list = []
    cfg = tiny(tmp_path / "run1", data=str(unmasked), masks=None, strategy="region", region_preset="lungs",
               max_steps=2, val_fraction=0.0, threads=1)
    result = pretrain(PretrainConfig.from_dict(cfg), on_event=events.append)
    assert result.step == 2
    preparing = [e for e in events if isinstance(e, Preparing)]
    assert preparing and preparing[-1].done == preparing[-1].total == 6 and "lungs" in preparing[-1].stage
    notes = next(e for e in events if isinstance(e, Started)).notes
    assert any("lungs preset for 6 image(s) (6 new, 0 from the cache); 0 flagged" in n for n in notes), notes
    events.clear()
    pretrain(PretrainConfig.from_dict({**cfg, "out": str(tmp_path / "run2")}), on_event=events.append)
    notes = next(e for e in events if isinstance(e, Started)).notes
    assert any("(0 new, 6 from the cache)" in n for n in notes), notes


def test_region_preset_settings_are_checked():
    with pytest.raises(ConfigError, match="region_preset='bones'"):
        PretrainConfig(data="x", out="y", strategy="region", region_preset="bones")
    with pytest.raises(ConfigError, match="use it with strategy=region"):
        PretrainConfig(data="x", out="y", strategy="random", region_preset="lungs")


def test_cli_region_preset_without_a_mask_folder(unmasked, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "pretrain", "--data", str(unmasked),
                           "--out", str(tmp_path / "run"), "--strategy", "region", "--region-preset", "lungs",
                           "--max-steps", "2", "--val-fraction", "0", *tiny_cli_flags()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "proposing lungs region masks: 6/6" in out and "region masks proposed with the lungs preset" in out
    without = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "pretrain", "--data", str(unmasked),
                              "--out", str(tmp_path / "run2"), "--strategy", "region", "--max-steps", "1",
                              *tiny_cli_flags()], capture_output=True, text=True, timeout=300)
    assert without.returncode == 2 and "--region-preset" in without.stderr


@pytest.mark.gui
def test_pretrain_dock_offers_a_region_preset_and_shows_the_proposal(make_napari_viewer, unmasked, tmp_path):
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    w = PretrainWidget(make_napari_viewer())
    w.data.value, w.out.value = str(unmasked), str(tmp_path / "run")
    w.strategy.value = "region"
    assert w.config_dict()["region_preset"] is None, "the dataset's own masks by default"
    w.regions.value = "propose: lungs"
    assert w.config_dict()["region_preset"] == "lungs"
    w.strategy.value = "random"
    assert w.config_dict()["region_preset"] is None, "random masking needs no regions"
    w.on_event(Preparing("proposing lungs region masks", 3, 6, 4.0))
    assert w.progress.value == 3 and w.progress.max == 6
    assert w.status.value.startswith("proposing lungs region masks: 3/6")
