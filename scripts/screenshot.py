"""Write docs/workbench.png: the workbench with the sample chest X-ray and its lung mask.

Run under a display (xvfb-run -a python scripts/screenshot.py).
"""

import sys
from pathlib import Path

import torch  # noqa: F401  (before napari: see tests/conftest.py)

import napari
from mim_workbench_napari._launch import open_workbench

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "workbench.png"
viewer = napari.Viewer(title="MIM Workbench", show=True)
viewer.window.resize(1500, 900)
widget = open_workbench(viewer)["Workbench"]
widget.ratio.value = 0.6
widget.show_preview.value = True
viewer.reset_view()
for _ in range(20):
    napari.qt.get_qapp().processEvents()
viewer.window.screenshot(str(out), canvas_only=False)
print(out)
viewer.close()
