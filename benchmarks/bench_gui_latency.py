"""How fluid the viewer stays while pretraining runs (the event-loop latency benchmark).

A 10 ms QTimer ticks in napari's Qt event loop; we record the gap between ticks, first
with the viewer idle, then while the workbench's own Pretrain dock trains on the sample
chest X-rays (started through the widget, so the real child-process path is measured).
Reports the median, p99 and max gap and the number of gaps over 50 ms, as JSON, and
names what the GUI thread was doing in each gap over 20 ms (a preview, a progress
repaint, or nothing of ours).

napari restores the last window size from its settings; the benchmark runs with a fresh
settings file and a fixed window (``--window``) so figures do not depend on an old session.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_gui_latency.py --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (before napari's GL context: see tests/conftest.py)

#: what the dock did, as (start, end, label), for naming the long gaps
_activity: list[tuple[float, float, str]] = []


def gaps_while(app, seconds: float, until=None) -> np.ndarray:
    return np.diff(ticks_while(app, seconds, until)) * 1000.0


def ticks_while(app, seconds: float, until=None) -> np.ndarray:
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
    return np.asarray(stamps)


def summary(gaps: np.ndarray) -> dict:
    return {"ticks": int(gaps.size), "median_ms": float(np.median(gaps)), "p99_ms": float(np.percentile(gaps, 99)),
            "max_ms": float(gaps.max()), "gaps_over_50ms": int((gaps > 50).sum())}


def _traced(fn, label: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _activity.append((t0, time.perf_counter(), label))
    return wrapper


def _trace_gc() -> None:
    """Name garbage collections too: a full collection of napari's objects takes tens of ms."""
    import gc

    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            _activity.append((started.pop(), time.perf_counter(), f"gc gen{info['generation']}"))

    gc.callbacks.append(callback)


def name_long_gaps(stamps: np.ndarray, threshold_ms: float = 20.0) -> dict[str, dict]:
    """The long gaps by what of ours ran inside them ('other': napari, Qt or GL on their own)."""
    named: dict[str, dict] = {}
    for a, b in zip(stamps[:-1], stamps[1:]):
        gap = (b - a) * 1000.0
        if gap <= threshold_ms:
            continue
        inside = sorted({label for s, e, label in _activity if s < b and e > a})
        entry = named.setdefault("+".join(inside) or "other", {"count": 0, "max_ms": 0.0})
        entry["count"] += 1
        entry["max_ms"] = round(max(entry["max_ms"], gap), 1)
    return named


def open_bench_viewer(window: str = "1200x900"):
    """(viewer, app, Pretrain dock): the workbench as ``mim-workbench gui`` opens it, in a window
    of a fixed size with fresh napari settings (napari restores an old session's window size)."""
    settings = Path(tempfile.mkdtemp(prefix="mim-bench-napari-")) / "settings.yaml"
    os.environ["NAPARI_CONFIG"] = str(settings)
    import napari
    from mim_workbench_napari._launch import open_workbench

    viewer = napari.Viewer(show=True)
    width, height = (int(v) for v in window.split("x"))
    viewer.window._qt_window.resize(width, height)
    docks = open_workbench(viewer)
    app = napari.qt.get_qapp()
    gaps_while(app, 2.0)  # the window's first paints are start-up, not idle
    return viewer, app, docks["Pretrain"]


def start_pretraining(w, data: str | Path, out: str | Path, *, img_size: int, batch: int, epochs: int) -> None:
    """Start CPU pretraining from the Pretrain dock ``w`` and wait for its first two steps."""
    w.data.value = str(data)
    w.out.value = str(out)
    w.img_size.value = img_size
    w.epochs.value = epochs
    w.batch.value = batch
    w.device.value = "cpu"
    w.start_training()
    from qtpy.QtWidgets import QApplication

    # let the child process start and reach its first steps before measuring
    gaps_while(QApplication.instance(), 120, until=lambda: w.plot.train[0] and len(w.plot.train[0]) > 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--window", default="1200x900", help="main window size WIDTHxHEIGHT")
    ap.add_argument("--out", default="benchmarks/results/gui_latency.json")
    ap.add_argument("--no-previews", action="store_true", help="drop Preview events (diagnosis)")
    args = ap.parse_args()

    _trace_gc()
    viewer, app, w = open_bench_viewer(args.window)
    import napari  # after open_bench_viewer: it points napari at fresh settings first

    idle = gaps_while(app, args.idle_seconds)

    on_event = w.on_event
    if args.no_previews:  # isolates what the preview layers cost the event loop
        on_event = lambda e, _orig=on_event: None if type(e).__name__ == "Preview" else _orig(e)  # noqa: E731
    w.job.on_event = lambda e: _traced(on_event, type(e).__name__)(e)
    w._flush_progress = _traced(w._flush_progress, "progress repaint")
    from mim_workbench.sample import sample_root

    # a fresh run folder: an old run there would end the new one at once (and measure an idle viewer)
    start_pretraining(w, sample_root(), Path(tempfile.mkdtemp(prefix="mim-gui-latency-")) / "run",
                      img_size=args.img_size, batch=8, epochs=1000)
    steps_before = len(w.plot.train[0])
    stamps = ticks_while(app, args.seconds)
    busy = np.diff(stamps) * 1000.0
    steps = len(w.plot.train[0]) - steps_before
    if steps == 0:
        raise SystemExit(f"no training step during the measurement ({w.status.value}): nothing was measured")
    w.stop_training()
    gaps_while(app, 60, until=lambda: w.worker is None)
    qw = viewer.window._qt_window
    result = {
        "benchmark": "qt_event_loop_10ms_timer",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "napari": napari.__version__,
                    "display": os.environ.get("DISPLAY", ""), "window": f"{qw.width()}x{qw.height()}"},
        "training": {"img_size": args.img_size, "batch": 8, "model": w.model.value, "seconds": args.seconds,
                     "steps_during_measurement": steps, "previews": not args.no_previews,
                     "preview_every_steps": w.config_dict()["preview_every"],
                     "torch_threads_in_child": max(1, (os.cpu_count() or 2) - 1)},
        "idle": summary(idle), "training_running": summary(busy),
        "gaps_over_20ms_during": name_long_gaps(stamps),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    viewer.close()


if __name__ == "__main__":
    main()
