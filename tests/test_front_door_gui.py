"""The front door, as users go through it: the README's command, ``mim-workbench gui`` and
napari's own launcher each open a real window (Xvfb, real GL) with the workbench's docks and
the image shown, under both Qt bindings; anything wrong is one line saying what."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DOCKS = ["Embedding map", "Evaluate", "Fine-tune", "Inspect", "Pretrain", "Workbench"]
BINDINGS = [pytest.param(api, marks=pytest.mark.skipif(importlib.util.find_spec(mod) is None,
                                                     reason=f"{mod} is not installed"))
            for api, mod in (("pyqt6", "PyQt6"), ("pyqt5", "PyQt5"))]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("QT_API", None)
    # a fresh napari settings folder: no window geometry or docks restored from another run
    env.update(MIM_WORKBENCH_CACHE=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "config"),
               NAPARI_CONFIG=str(tmp_path / "config" / "napari" / "settings.yaml"))
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))


def _report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _assert_canvas_shows_image(record: dict) -> None:
    """The canvas part of the screenshot holds a picture, not napari's empty black canvas."""
    shot = np.asarray(Image.open(record["screenshot"]).convert("L"), dtype=np.float32)
    x, y, w, h = record["canvas_box"]
    assert w > 100 and h > 100, record["canvas_box"]
    canvas = shot[y:y + h, x:x + w]
    background = np.median(shot[y:y + 5, x:x + w])  # the canvas's top rows: above the image
    lit = np.abs(canvas - background) > 25
    assert lit.mean() > 0.15, f"only {lit.mean():.1%} of the canvas differs from its background"
    assert canvas[lit].std() > 10, "the image on the canvas is flat"


def _assert_record(record: dict, qt_api: str) -> None:
    for key in ("napari", "qt_api", "gl_renderer", "docks", "layers", "seconds_to_ready"):
        assert key in record, key
    assert record["qt_api"].lower().startswith(qt_api)
    assert record["gl_renderer"] and "OpenGL" in record["gl_renderer"]
    assert sorted(record["docks"]) == sorted(DOCKS)
    assert 0 < record["seconds_to_ready"] < 240


def test_readme_command_self_check_opens_the_sample(tmp_path):
    """``bash scripts/workbench.sh --self-check``: set-up (already done) then the real launch."""
    shot = tmp_path / "window.png"
    env = _env(tmp_path, MIM_VENV=str(Path(sys.prefix)))
    proc = _run(["bash", "scripts/workbench.sh", "--self-check", "--screenshot", str(shot)], env, timeout=600)
    record = _report(proc)
    _assert_record(record, "pyqt6" if importlib.util.find_spec("PyQt6") else "pyqt5")
    assert record["layers"] == ["cxr0162", "region: cxr0162"]
    _assert_canvas_shows_image(record)


@pytest.mark.parametrize("qt_api", BINDINGS)
def test_gui_self_check_opens_a_dicom_under_each_binding(tmp_path, sample_root, qt_api):
    shot = tmp_path / "window.png"
    dicom = sample_root / "dicom" / "hd_dx_image.dcm"
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check", "--screenshot", str(shot), str(dicom)],
                _env(tmp_path, QT_API=qt_api))
    record = _report(proc)
    _assert_record(record, qt_api)
    assert record["layers"] == ["hd_dx_image"]
    _assert_canvas_shows_image(record)


def test_gui_self_check_opens_a_png_folder(tmp_path, sample_root):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for name in ("cxr0000.png", "cxr0058.png"):
        (folder / name).write_bytes((sample_root / "images" / name).read_bytes())
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check", "--screenshot", str(tmp_path / "w.png"),
                 str(folder)], _env(tmp_path))
    record = _report(proc)
    assert sorted(record["layers"]) == ["cxr0000", "cxr0058"]
    _assert_canvas_shows_image(record)


def test_napari_launcher_runs_the_self_check_from_the_environment(tmp_path, sample_root):
    out = tmp_path / "check.json"
    shot = tmp_path / "napari.png"
    env = _env(tmp_path, QT_API="pyqt6", MIM_WORKBENCH_SELF_CHECK=str(out),
               MIM_WORKBENCH_SELF_CHECK_SCREENSHOT=str(shot))
    image = sample_root / "images" / "cxr0162.png"
    proc = _run([str(VENV_BIN / "napari"), "--plugin", "mim-workbench", str(image), "-w", "mim-workbench", "__all__"],
                env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    _assert_record(record, "pyqt6")
    assert record["layers"] == ["cxr0162"]
    _assert_canvas_shows_image(record)


def test_self_check_without_a_display_fails_instead_of_running_the_demo(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check"], env, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "no display" in proc.stderr
    assert not (tmp_path / "mim-demo").exists() and not (REPO / "mim-demo").exists()


def test_self_check_names_a_dead_display(tmp_path):
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check"], _env(tmp_path, DISPLAY=":987"), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "DISPLAY=:987" in proc.stderr


def test_self_check_names_a_missing_qt_binding(tmp_path):
    """Qt bindings that fail to import (a broken install) are named, with what to install."""
    shadow = tmp_path / "shadow"
    for mod in ("PyQt6", "PyQt5", "PySide6", "PySide2"):
        (shadow / mod).mkdir(parents=True)
        (shadow / mod / "__init__.py").write_text(f"raise ImportError('{mod} is broken here')\n")
    env = _env(tmp_path, PYTHONPATH=str(shadow))
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check"], env, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "no Qt binding" in proc.stderr and "mim-workbench[gui]" in proc.stderr


def test_self_check_names_a_file_that_does_not_open(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM but not really")
    proc = _run([str(VENV_BIN / "mim-workbench"), "gui", "--self-check", str(bad)], _env(tmp_path))
    assert proc.returncode != 0
    assert "broken.dcm" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
