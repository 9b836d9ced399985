"""`mim-workbench gui` without a display says so and runs the headless demo."""

import json
import os
import subprocess
import sys


def test_gui_without_display_runs_the_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MIM_WORKBENCH_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "gui", "--demo-out", str(out),
                           "--demo-seconds", "6"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no display" in proc.stderr
    summary = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").is_file() and (out / "reconstruction" / "recon_plus_visible.png").is_file()
    assert summary["psnr"] > 0 and summary["psnr_baseline"] > 0


def test_info_prints_json_lines_and_fails_cleanly(tmp_path, sample_root):
    good = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "info", str(sample_root / "dicom")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0
    records = [json.loads(line) for line in good.stdout.splitlines()]
    assert len(records) == 2
    dx = next(r for r in records if r["path"].endswith("hd_dx_image.dcm"))
    assert dx["modality"] == "DX" and dx["spacing"][0] > 0 and dx["photometric"] == "MONOCHROME1"
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "info", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "empty.dcm" in proc.stderr and "Traceback" not in proc.stderr
