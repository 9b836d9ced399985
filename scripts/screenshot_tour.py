"""Drive the workbench through its steps and screenshot each into docs/tour-*.png.

Run under a display: ``xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_tour.py [OUT_DIR]``.
Takes about five minutes on a 2-core CPU (90 s of pretraining with the quick-cpu preset).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (before napari: see tests/conftest.py)

import mim_workbench.inference.reconstruct  # noqa: F401
import mim_workbench.training  # noqa: F401
import napari
import numpy as np
from mim_workbench import sample
from mim_workbench.io import read_image
from mim_workbench.sample import sample_root
from mim_workbench_napari._finetune_widget import FROM_DATASET, STROKES_PREFIX, TASK_CLASSIFY, TASK_DENSE
from mim_workbench_napari._launch import open_workbench

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs"
app = napari.qt.get_qapp()


def pump(seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"tour: timed out waiting for {what}")
        pump(0.1)


def shot(viewer, docks, name: str, tab: str) -> None:
    from qtpy.QtWidgets import QDockWidget

    dock = docks[tab].native
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parent()
    dock.raise_()
    pump(0.5)
    path = OUT / f"tour-{name}.png"
    viewer.window.screenshot(str(path), canvas_only=False)
    print(path)


def only(viewer, names: list[str]):
    """Keep just ``names`` in the viewer (grid cells and the view fit them); returns a restore."""
    stash = [(i, layer) for i, layer in enumerate(viewer.layers) if layer.name not in names]
    for _, layer in stash:
        viewer.layers.remove(layer)
    viewer.reset_view()

    def restore() -> None:
        for i, layer in stash:
            viewer.layers.insert(i, layer)

    return restore


def main() -> None:
    # training children are spawned: they re-import this module, so nothing may run at import
    work = Path(tempfile.mkdtemp(prefix="mim-tour-"))
    viewer = napari.Viewer(title="MIM Workbench", show=True)
    viewer.window.resize(1600, 950)
    docks = open_workbench(viewer)
    bench, pre, insp, ft = docks["Workbench"], docks["Pretrain"], docks["Inspect"], docks["Fine-tune"]
    image = viewer.layers["cxr0162"]

    # 1. regions: auto-proposed lungs (editable) and the region-guided masking preview
    bench.preset.value = "lungs"
    bench.propose_region()
    bench.strategy.value = "region"
    bench.ratio.value = 0.5
    bench.show_preview.value = True
    viewer.reset_view()
    shot(viewer, docks, "1-regions", "Workbench")
    bench.show_preview.value = False  # it follows the selected image; keep later pictures clean

    # 2. pretraining in the background: progress, loss curve, previews updated in place
    pre.preset.value = "quick-cpu"
    pre.epochs.value = 400
    pre.data.value = str(sample_root())
    pre.out.value = str(work / "pretrain")
    pre.device.value = "cpu"
    pre.start_training()
    pump(90)
    preview_names = [l.name for l in viewer.layers if l.name.split(":")[0] in ("masked", "recon", "error")]
    restore = only(viewer, preview_names)
    viewer.canvas.grid.enabled = True
    viewer.reset_view()
    shot(viewer, docks, "2-pretrain", "Pretrain")
    viewer.canvas.grid.enabled = False
    restore()
    pre.stop_training()
    wait(lambda: pre.worker is None, 120, "the pretraining run to stop")
    checkpoint = str(pre.resume_from.value)

    # 3. inspect an image never trained on: a DICOM chest radiograph, side by side
    thorax = next(p for p in sample.dicom_files() if "dx" in p.name.lower())
    unseen = read_image(thorax)
    layer = viewer.add_image(unseen.data, name="unseen DX", scale=unseen.scale)
    insp.checkpoint.value = checkpoint
    insp.image.value = layer
    insp.strategy.value = "random"
    insp.ratio.value = 0.5
    insp.reconstruct()
    wait(lambda: insp.worker is None, 120, "the reconstruction")
    restore = only(viewer, ["unseen DX", "masked: unseen DX", "recon+visible: unseen DX", "error: unseen DX"])
    insp.side_by_side.value = True
    viewer.reset_view()
    shot(viewer, docks, "3-inspect", "Inspect")
    insp.side_by_side.value = False
    restore()

    # 4. dense head from a few painted strokes on the pretrained encoder, predictions overlaid
    ft.task.value = TASK_DENSE
    ft.image.value = image
    ft.create_strokes_layer()
    strokes = viewer.layers[STROKES_PREFIX + image.name]
    lungs = viewer.layers["region: cxr0162"].data.astype(bool)
    rng = np.random.default_rng(0)
    strokes.brush_size = 4
    for label, where in ((1, lungs), (2, ~lungs)):
        rr, cc = np.nonzero(where)
        for i in rng.choice(len(rr), 30, replace=False):
            strokes.paint((int(rr[i]), int(cc[i])), label)
    ft.classes.value = "lung, other"
    ft.encoder.value = checkpoint
    ft.steps.value = 150
    ft.out.value = str(work / "dense")
    ft.device.value = "cpu"
    ft.start_training()
    wait(lambda: ft.worker is None, 600, "the dense head")
    ft.predict()
    wait(lambda: ft.predict_worker is None, 120, "the dense prediction")
    restore = only(viewer, ["cxr0162", "heatmap: cxr0162", STROKES_PREFIX + "cxr0162"])
    shot(viewer, docks, "4-dense", "Fine-tune")
    restore()

    # 5. classifier from the sample labels (COVID-19 / other pneumonia): probabilities + heat map
    ft.task.value = TASK_CLASSIFY
    ft.labels_from.value = FROM_DATASET
    ft.data.value = str(sample_root())
    ft.out.value = str(work / "classifier")
    ft.epochs.value = 60
    ft.start_training()
    wait(lambda: ft.worker is None, 600, "the classifier")
    ft.image.value = image
    ft.predict()
    wait(lambda: ft.predict_worker is None, 120, "the class prediction")
    only(viewer, ["cxr0162", "heatmap: cxr0162"])
    shot(viewer, docks, "5-classify", "Fine-tune")
    viewer.close()


if __name__ == "__main__":
    main()
