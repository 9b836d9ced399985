"""How fluid the viewer stays while pretraining runs (issue 5's event-loop benchmark).

A 10 ms QTimer ticks in napari's Qt event loop; we record the gap between ticks, first
with the viewer idle, then while the Pretrain dock trains on the sample chest X-rays
(started through the widget, so the real child-process path is measured). Reports the
median, p99 and max gap and the number of gaps over 50 ms, as JSON.

    xvfb-run -a python benchmarks/bench_gui_latency.py --seconds 30 --out benchmarks/results/gui_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import platform
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (before napari's GL context: see tests/conftest.py)


def gaps_while(app, seconds: float, until=None) -> np.ndarray:
    from qtpy.QtCore import QTimer

    stamps: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: stamps.append(time.perf_counter()))
    timer.start()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (until and until()):
        app.processEvents()
        time.sleep(0.001)
    timer.stop()
    return np.diff(np.asarray(stamps)) * 1000.0


def summary(gaps: np.ndarray) -> dict:
    return {"ticks": int(gaps.size), "median_ms": float(np.median(gaps)), "p99_ms": float(np.percentile(gaps, 99)),
            "max_ms": float(gaps.max()), "gaps_over_50ms": int((gaps > 50).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out", default="benchmarks/results/gui_latency.json")
    ap.add_argument("--no-previews", action="store_true", help="drop Preview events (diagnosis)")
    args = ap.parse_args()

    import napari
    from mim_workbench.sample import sample_root
    from mim_workbench_napari._launch import open_workbench
    from mim_workbench_napari._pretrain_widget import PretrainWidget

    viewer = napari.Viewer(show=True)
    open_workbench(viewer)
    app = napari.qt.get_qapp()
    idle = gaps_while(app, args.idle_seconds)

    w = PretrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="bench pretrain")
    w.data.value = str(sample_root())
    # a fresh run folder: an old run there would end the new one at once (and measure an idle viewer)
    w.out.value = str(Path(tempfile.mkdtemp(prefix="mim-gui-latency-")) / "run")
    if args.no_previews:  # isolates what the preview layers cost the event loop
        w.job.on_event = lambda e, _orig=w.on_event: None if type(e).__name__ == "Preview" else _orig(e)
    w.img_size.value = args.img_size
    w.epochs.value = 1000
    w.batch.value = 8
    w.device.value = "cpu"
    w.start_training()
    # let the child process start and reach its first steps before measuring
    gaps_while(app, 60, until=lambda: w.plot.train[0] and len(w.plot.train[0]) > 1)
    steps_before = len(w.plot.train[0])
    busy = gaps_while(app, args.seconds)
    steps = len(w.plot.train[0]) - steps_before
    if steps == 0:
        raise SystemExit(f"no training step during the measurement ({w.status.value}): nothing was measured")
    w.stop_training()
    gaps_while(app, 60, until=lambda: w.worker is None)
    result = {
        "benchmark": "qt_event_loop_10ms_timer",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "napari": napari.__version__},
        "training": {"img_size": args.img_size, "batch": 8, "model": w.model.value, "seconds": args.seconds,
                     "steps_during_measurement": steps, "previews": not args.no_previews, "torch_threads_in_child": max(1, (os.cpu_count() or 2) - 1)},
        "idle": summary(idle), "training_running": summary(busy),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    viewer.close()


if __name__ == "__main__":
    main()
