"""Soak benchmark (not a test): pretraining for a long time on the CPU, watching memory
and, with a display, the viewer's event loop at the start and at the end.

What it reports (JSON, also printed):

* ``memory``: resident set size (RSS) of the training process - and of the viewer
  process in GUI mode - sampled every ``--sample-every`` seconds; ``growth_mb`` is the
  median of the last 5 % of samples minus the median of the 5 % after warm-up (the first
  ``--warmup-minutes``), ``slope_mb_per_hour`` a least-squares fit after warm-up.
  Target: no growth beyond the decoded-image cache, which is on disk and capped
  (``cache.bytes`` <= ``cache.max_bytes``), so the RSS should stay flat.
* ``event_loop`` (GUI mode): gaps of a 10 ms Qt timer (``bench_gui_latency.py``'s
  measurement) idle before training, in the first and last ``--gui-seconds`` of
  training, and idle after it stopped.
* ``training``: steps, checkpoints written, the losses at both ends, failures.

GUI mode (default when a display exists) trains through the workbench's Pretrain dock
in the viewer ``bench_gui_latency.py`` opens (the real child-process path, with the
preview layers and loss curve updating; the dock does not switch the decoded-image
cache on); ``--headless`` runs the same child process through
``TrainingProcess`` with the cache on.  Both use a private cache folder, removed at the end.

    xvfb-run -a python benchmarks/soak.py --minutes 20 --out benchmarks/results/soak.json
    python benchmarks/soak.py --headless --minutes 20 --out benchmarks/results/soak-headless.json

Needs psutil (installed with napari).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: F401  (before napari's GL context: see tests/conftest.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gui_latency import gaps_while, open_bench_viewer, start_pretraining, summary  # noqa: E402


def _psutil():
    try:
        import psutil
    except ImportError:
        sys.exit("benchmarks/soak.py needs psutil (pip install psutil)")
    return psutil


def rss_mb(proc: Any) -> float | None:
    try:
        return proc.memory_info().rss / 2**20
    except Exception:  # the process ended between two samples
        return None


def training_child(psutil: Any) -> Any:
    """The training child of this process: the largest of its children (the rest is
    multiprocessing's small resource tracker)."""
    kids = psutil.Process().children(recursive=True)
    sized = [(rss_mb(k) or 0.0, k) for k in kids]
    return max(sized, key=lambda t: t[0])[1] if sized else None


def growth(times: list[float], values: list[float | None], warmup_s: float) -> dict[str, Any]:
    pts = [(t, v) for t, v in zip(times, values) if v is not None]
    if not pts:
        return {"samples": 0}
    t = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts])
    after = t >= min(warmup_s, t[-1] * 0.5)   # short runs: the second half counts
    ta, va = t[after], v[after]
    k = max(1, int(round(0.05 * len(va))))
    out = {"samples": int(len(v)), "first_mb": float(v[0]), "after_warmup_mb": float(np.median(va[:k])),
           "final_mb": float(np.median(va[-k:])), "max_mb": float(v.max()),
           "growth_mb": float(np.median(va[-k:]) - np.median(va[:k]))}
    if len(ta) >= 3 and ta[-1] > ta[0]:
        out["slope_mb_per_hour"] = float(np.polyfit(ta / 3600.0, va, 1)[0])
    return out


def training_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from mim_workbench.sample import sample_root

    root = sample_root()
    return {
        "data": str(root / "images"), "masks": str(root / "masks"), "out": str(out), "strategy": "region",
        "img_size": args.img_size, "batch_size": args.batch, "epochs": 100_000, "device": "cpu",
        "time_budget_s": args.minutes * 60.0, "cache": True, "preview_every": 25,
        "checkpoint_every": "epoch", "checkpoint_interval_s": 60.0, "keep_checkpoints": 3,
    }


def soak_headless(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from mim_workbench.training import events as ev
    from mim_workbench.training.runner import TrainingProcess

    psutil = _psutil()
    run = TrainingProcess(training_config(args, out))
    run.start()
    t0 = time.monotonic()
    times, child_rss = [], []
    steps, losses, checkpoints, failed = 0, [], 0, None
    next_sample = t0
    child = None
    while run.running:
        for e in run.poll(0.5):
            if isinstance(e, ev.Progress):
                steps = e.step
                if e.loss == e.loss:
                    losses.append(e.loss)
            elif isinstance(e, ev.CheckpointSaved):
                checkpoints += 1
            elif isinstance(e, ev.Failed):
                failed = e.message
        if time.monotonic() >= next_sample:
            child = child if child is not None and child.is_running() else training_child(psutil)
            times.append(time.monotonic() - t0)
            child_rss.append(rss_mb(child) if child is not None else None)
            next_sample += args.sample_every
    run.join(60)
    return {"mode": "headless", "wall_s": time.monotonic() - t0,
            "memory": {"training_process": growth(times, child_rss, args.warmup_minutes * 60)},
            "training": {"steps": steps, "checkpoints": checkpoints, "failed": failed,
                         "loss_first": losses[0] if losses else None,
                         "loss_last": float(np.mean(losses[-20:])) if losses else None},
            "samples": {"t_s": times, "training_rss_mb": child_rss}}


def soak_gui(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    psutil = _psutil()
    me = psutil.Process()
    viewer, app, w = open_bench_viewer(args.window)
    idle_before = gaps_while(app, args.gui_seconds)
    cfg = training_config(args, out)
    start_pretraining(w, Path(cfg["data"]).parent, cfg["out"], img_size=args.img_size, batch=args.batch,
                      epochs=10_000)
    t0 = time.monotonic()
    start = gaps_while(app, args.gui_seconds)
    times, child_rss, gui_rss = [], [], []
    child = None
    end_at = t0 + args.minutes * 60.0 - args.gui_seconds
    while time.monotonic() < end_at and w.worker is not None:
        gaps_while(app, min(args.sample_every, max(0.1, end_at - time.monotonic())))
        child = child if child is not None and child.is_running() else training_child(psutil)
        times.append(time.monotonic() - t0)
        child_rss.append(rss_mb(child) if child is not None else None)
        gui_rss.append(rss_mb(me))
    end = gaps_while(app, args.gui_seconds)
    steps = len(w.plot.train[0])
    losses = list(w.plot.train[1]) if len(w.plot.train) > 1 else []
    w.stop_training()
    gaps_while(app, 120, until=lambda: w.worker is None)
    idle_after = gaps_while(app, args.gui_seconds)
    result = {"mode": "gui", "wall_s": time.monotonic() - t0,
              "event_loop": {"idle_before": summary(idle_before), "training_start": summary(start),
                             "training_end": summary(end), "idle_after": summary(idle_after)},
              "memory": {"training_process": growth(times, child_rss, args.warmup_minutes * 60),
                         "viewer_process": growth(times, gui_rss, args.warmup_minutes * 60)},
              "training": {"steps": steps, "checkpoints": len(list(out.glob("ckpt-*"))),
                           "status": str(w.status.value),
                           "loss_first": float(losses[0]) if losses else None,
                           "loss_last": float(np.mean(losses[-20:])) if losses else None},
              "samples": {"t_s": times, "training_rss_mb": child_rss, "viewer_rss_mb": gui_rss}}
    viewer.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training time (default 20)")
    ap.add_argument("--headless", action="store_true", help="no viewer (default when there is no display)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--warmup-minutes", type=float, default=2.0, help="memory growth is measured after this")
    ap.add_argument("--gui-seconds", type=float, default=20.0, help="length of each event-loop window")
    ap.add_argument("--window", default="1200x900", help="GUI mode: main window size WIDTHxHEIGHT")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()

    headless = args.headless or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    with tempfile.TemporaryDirectory(prefix="mim-soak-") as tmp:
        # A private decoded-image cache (the child inherits it), so its cap is what we measure.
        os.environ["MIM_WORKBENCH_CACHE"] = str(Path(tmp) / "cache")
        run_dir = Path(tmp) / "run"
        result = soak_headless(args, run_dir) if headless else soak_gui(args, run_dir)
        from mim_workbench.io.cache import DecodeCache

        cache = DecodeCache()
        result["cache"] = {"root": str(cache.root), "bytes": cache.size_bytes(), "max_bytes": cache.max_bytes}
    result.update({
        "benchmark": "soak", "minutes": args.minutes, "img_size": args.img_size, "batch": args.batch,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__},
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    brief = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
