#!/usr/bin/env python
"""The pretraining study on chest X-rays, as a user runs it: two ``mim-workbench evaluate`` commands.

1. COVID-19 / Normal (``cxr_covid19_radiography``): the pool is the collection itself (labels
   ignored; the command removes the labelled test split from it), the labelled set the same
   collection, split by patient.
2. Transfer: paediatric Normal / Pneumonia (``cxr_kermany_pneumonia``, another hospital and
   task) probed on the *same* encoders (``--encoders`` of the first study: none of these
   images is in the pool, so every encoder is reused as it is).

    python benchmarks/pretraining_study.py --work /tmp/study [--minutes 20] [--seeds 3]

The tables, plots and summaries are copied to ``benchmarks/results/study-<date>/``; work
folders (encoders, runs) stay in ``--work``.  Re-running resumes both studies.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def evaluate(args: argparse.Namespace, name: str, data: Path, fractions: str, extra: list[str]) -> Path:
    out = args.work / name
    cmd = [sys.executable, "-m", "mim_workbench.cli", "evaluate", "--unlabeled", str(args.pool), "--data", str(data),
           "--variants", args.variants, "--region-preset", "lungs", "--fractions", fractions,
           "--seeds", str(args.seeds), "--budget-minutes", str(args.minutes), "--mode", args.mode,
           "--threads", str(args.threads), "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=Path, default=SHARED / "cxr_covid19_radiography")
    p.add_argument("--covid", type=Path, default=SHARED / "cxr_covid19_radiography")
    p.add_argument("--kermany", type=Path, default=SHARED / "cxr_kermany_pneumonia")
    p.add_argument("--work", type=Path, default=Path("/tmp/study"))
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mode", default="probe")
    p.add_argument("--variants", default="scratch,mae,rgmim,simmim,miram,beit,feature")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path,
                   default=Path(__file__).resolve().parent / "results" / f"study-{time.strftime('%Y-%m-%d')}")
    args = p.parse_args()
    first = evaluate(args, f"covid19-{args.mode}", args.covid, "0.01,0.05,0.1,1", [])
    second = evaluate(args, f"kermany-{args.mode}", args.kermany, "0.01,0.1,1",
                      ["--encoders", str(first / "encoders")])
    for study in (first, second):
        dest = args.results / study.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("table.md", "summary.json", "results.csv", "plot.png"):
            shutil.copy(study / f, dest / f)
    print(f"results in {args.results}")


if __name__ == "__main__":
    main()
