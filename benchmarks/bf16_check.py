"""Does CPU bf16 autocast train like fp32?  Same model init, same batches, same masks.

    python benchmarks/bf16_check.py --steps 40 [--method mae] [--data DIR]

Prints one JSON line per step (fp32 loss, bf16 loss, relative difference) and a
summary line; images come from the chest X-rays the data benchmark uses.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mim_workbench.bench import REFERENCE_CONFIG, default_data_root, make_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--method", default="mae")
    ap.add_argument("--lr", type=float, default=1.5e-4 * 16 / 256 * 10, help="constant lr (default 10x MAE's blr rule)")
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    from torch.utils.data import DataLoader

    from mim_workbench.io.datasets import discover
    from mim_workbench.training.mim_dataset import MIMDataset

    images, masks = (Path(args.data), None) if args.data else default_data_root()
    cfg = {**REFERENCE_CONFIG, "method": args.method, "lr": args.lr}
    ds = MIMDataset(discover(images, masks=masks).samples, img_size=(224, 224), in_chans=1, augment=False,
                    fine_scale=2 if args.method == "miram" else None)
    loader = DataLoader(ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    fp32, bf16 = make_step(cfg, seed=0), make_step(cfg, seed=0, amp="bf16")
    rows, step, t = [], 0, {"fp32": 0.0, "bf16": 0.0}
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            x, fine = batch["image"], batch.get("fine")
            t0 = time.perf_counter()
            a = float(fp32(x, fine=fine))
            t1 = time.perf_counter()
            b = float(bf16(x, fine=fine))
            t["fp32"] += t1 - t0
            t["bf16"] += time.perf_counter() - t1
            rows.append({"step": step + 1, "fp32": a, "bf16": b, "rel_diff": abs(b - a) / abs(a)})
            print(json.dumps(rows[-1]), flush=True)
            step += 1
    tail = rows[len(rows) // 2:]
    print(json.dumps({
        "summary": True, "method": args.method, "steps": len(rows), "lr": args.lr,
        "all_finite": all(math.isfinite(r["bf16"]) for r in rows),
        "max_rel_diff": max(r["rel_diff"] for r in rows),
        "median_rel_diff": statistics.median(r["rel_diff"] for r in rows),
        "fp32_mean_last_half": statistics.mean(r["fp32"] for r in tail),
        "bf16_mean_last_half": statistics.mean(r["bf16"] for r in tail),
        "fp32_s_per_step": t["fp32"] / len(rows), "bf16_s_per_step": t["bf16"] / len(rows),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
