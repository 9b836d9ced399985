"""Write docs/inspect.png: Inspect dock, side by side, on a held-out X-ray.

    xvfb-run -a python scripts/screenshot_inspect.py CHECKPOINT [OUT.png]
(CHECKPOINT e.g. from `mim-workbench demo --out mim-demo`: mim-demo/run)
"""

import sys
import time
from pathlib import Path

import torch  # noqa: F401  (before napari: see tests/conftest.py)

import napari
from mim_workbench import sample
from mim_workbench.io import read_image
from mim_workbench_napari._inspect_widget import InspectWidget

ckpt = sys.argv[1]
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "docs" / "inspect.png"
viewer = napari.Viewer(title="MIM Workbench", show=True)
viewer.window.resize(1500, 900)
img_path, _ = sample.chest_xray("cxr0181")  # held back from the demo's training
img = read_image(img_path)
layer = viewer.add_image(img.data, name="cxr0181", scale=img.scale)
from mim_workbench.regions import propose_region

lungs = viewer.add_labels(propose_region(img.data, "lungs"), name="region: cxr0181", scale=img.scale, opacity=0.3)
w = InspectWidget(viewer)
viewer.window.add_dock_widget(w, name="Inspect")
w.checkpoint.value = ckpt
w.image.value = layer
w.region.value = lungs
w.ratio.value = 0.5
w.reconstruct()
app = napari.qt.get_qapp()
end = time.time() + 60
while w.worker is not None and time.time() < end:
    app.processEvents()
    time.sleep(0.01)
lungs.visible = False
w.side_by_side.value = True
viewer.reset_view()
for _ in range(20):
    app.processEvents()
viewer.window.screenshot(str(out), canvas_only=False)
print(out)
viewer.close()
