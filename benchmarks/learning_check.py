#!/usr/bin/env python
"""Does each method learn with its own defaults?  A short run per method on ~100 chest X-rays.

For every method: ``mim-workbench pretrain --method M --img-size 112 --max-steps 120`` on the
same images (every 24th of ``cxr_covid19_radiography`` by default), then the mean of the
first and of the last 10 steps of ``metrics.csv``: the loss, and each method's own step
metric (BEiT's ``token_acc`` beside ``token_base``, the feature targets' ``target_std``).
Step counts, not time, bound the runs, so a busy machine changes the timings, not the numbers.

    python benchmarks/learning_check.py --methods beit,feature [--seeds 0,1] [--data DIR]

One JSON line per run on stdout; the runs are kept in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_covid19_radiography" / "images"


def subset(source: Path, every: int, limit: int, work: Path) -> Path:
    """A folder of symlinks to every ``every``-th image of ``source`` (at most ``limit``)."""
    out = work / "images"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir())[::every][:limit]:
        link = out / path.name
        if not link.exists():
            link.symlink_to(path)
    return out


def run(method: str, seed: int, data: Path, work: Path, steps: int) -> dict:
    """One pretraining run; the first and last 10 steps' means of every logged number."""
    from mim_workbench.training.metrics_log import read_metrics

    out = work / f"{method}-s{seed}"
    if not (out / "metrics.csv").is_file():
        subprocess.run([sys.executable, "-m", "mim_workbench.cli", "pretrain", "--data", str(data), "--out", str(out),
                        "--method", method, "--img-size", "112", "--max-steps", str(steps), "--epochs", "20",
                        "--val-fraction", "0", "--preview-every", "0", "--seed", str(seed), "--quiet"], check=True)
    rows = read_metrics(out / "metrics.csv")
    keys = [k for k in ("loss", "token_acc", "token_base", "target_std") if rows[0].get(k) is not None]
    return {"method": method, "seed": seed, "steps": len(rows),
            **{f"{k}_first10": float(np.mean([r[k] for r in rows[:10]])) for k in keys},
            **{f"{k}_last10": float(np.mean([r[k] for r in rows[-10:]])) for k in keys}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="beit,feature")
    p.add_argument("--seeds", default="0")
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--every", type=int, default=24)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mim-learning-check")
    args = p.parse_args()
    data = subset(args.data, args.every, args.images, args.work)
    for method in args.methods.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            print(json.dumps(run(method, seed, data, args.work, args.steps)), flush=True)


if __name__ == "__main__":
    main()
