"""What one in-place layer update costs napari's event loop on this display, without the workbench.

The floor under ``bench_gui_latency.py``: a bare napari viewer (one 512² image, N 256² layers)
updates the N layers in place every 2 s (``data[...] = new; layer.refresh()``), as our preview
layers are, while K single-threaded processes keep K cores busy (as the training child does).
A 10 ms QTimer measures the gaps. On Xvfb + llvmpipe the redraw of the canvas after one such
update is what sets the maximum gap; with a GPU display it is far cheaper.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_napari_floor.py --busy 1 --layers 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _busy(stop) -> None:
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a * 0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=1, help="cores kept busy by other processes")
    ap.add_argument("--layers", type=int, default=3, help="layers updated together")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    os.environ["NAPARI_CONFIG"] = str(Path(tempfile.mkdtemp(prefix="mim-floor-napari-")) / "settings.yaml")
    import napari
    from qtpy.QtCore import QTimer

    from bench_gui_latency import gaps_while, summary

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    rng = np.random.default_rng(0)
    viewer.add_image(rng.random((512, 512), dtype=np.float32), contrast_limits=(0, 1))
    layers = [viewer.add_image(rng.random((256, 256), dtype=np.float32), name=f"p{i}", contrast_limits=(0, 1))
              for i in range(args.layers)]
    app = napari.qt.get_qapp()
    gaps_while(app, 3.0)  # start-up paints

    stop = mp.Event()
    procs = [mp.Process(target=_busy, args=(stop,)) for _ in range(args.busy)]
    for p in procs:
        p.start()

    def update() -> None:
        for layer in layers:
            layer.data[...] = rng.random(layer.data.shape, dtype=np.float32)
            layer.refresh()

    timer = QTimer()
    timer.setInterval(2000)
    timer.timeout.connect(update)
    timer.start()
    try:
        gaps = gaps_while(app, args.seconds)
    finally:
        timer.stop()
        stop.set()
        for p in procs:
            p.join()
    result = {"benchmark": "napari_layer_update_floor", "busy_cores": args.busy, "layers_updated": args.layers,
              "update_every_s": 2.0, "cpus": os.cpu_count(), "napari": napari.__version__,
              "window": "1200x900", "gaps": summary(gaps)}
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    viewer.close()


if __name__ == "__main__":
    main()
