"""Does ``pretrain(amp="bf16")`` on the CPU train like ``amp="off"``?  The real loop, twice.

    python benchmarks/bf16_pretrain_check.py --steps 150 [--config reference|demo] [--out FILE]

Runs the training loop (data, masks, schedule, validation) with the same seed once in
fp32 and once with CPU bf16 autocast, and prints one JSON line per run (train losses,
validation losses, seconds per step) and a comparison line.  The decision "amp=auto
picks bf16 on this CPU" in ``training/runtime.py`` rests on these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim_workbench.bench import default_data_root  # noqa: E402
from mim_workbench.training import PretrainConfig, pretrain  # noqa: E402

CONFIGS = {
    # the benchmark's reference: ViT-Tiny/16 at 224 px, decoder 128 x 4 x 4, batch 16, norm_pix_loss
    "reference": dict(img_size=(224, 224), decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
                      batch_size=16, norm_pix_loss=True, method="mae", strategy="random", lr=1e-3 * 16 / 256 * 4),
    # the demo's tiny model (mim-workbench demo), whose speed users see first
    "demo": dict(method="simmim", strategy="random", ratio=0.5, img_size=(64, 64), patch_size=4, embed_dim=64,
                 depth=2, num_heads=4, batch_size=8, lr=3e-3),
}


def run(amp: str, name: str, steps: int, data: str, out: str, val_every: int) -> dict:
    cfg = PretrainConfig.from_dict(dict(data=data, out=out, amp=amp, device="cpu", epochs=max(1, steps), max_steps=steps,
                         warmup_epochs=1.0, preview_every=0, checkpoint_every=100_000, val_every=val_every,
                         seed=0, augment=True, cache=True, **CONFIGS[name]))
    t = time.perf_counter()
    res = pretrain(cfg)
    wall = time.perf_counter() - t
    losses = [r["loss"] for r in res.history]
    vals = [(r["step"], r["val_loss"]) for r in res.history if r.get("val_loss") is not None]
    return {"amp": amp, "config": name, "steps": len(losses), "wall_s": wall,
            "s_per_step": res.history[-1]["elapsed_s"] / len(losses), "losses": losses, "val": vals,
            "final_val": res.val_loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="reference")
    ap.add_argument("--data", default=None)
    ap.add_argument("--val-every", type=int, default=2)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    data = args.data or str(default_data_root()[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bf16-check-") as tmp:
        for amp in ("off", "bf16"):
            rows.append(run(amp, args.config, args.steps, data, os.path.join(tmp, amp), args.val_every))
    a, b = rows
    n = len(a["losses"])
    tail = slice(n // 2, n)
    rel = [abs(y - x) / abs(x) for x, y in zip(a["losses"], b["losses"])]
    vrel = [abs(y - x) / abs(x) for (_, x), (_, y) in zip(a["val"], b["val"])]
    summary = {
        "summary": True, "config": args.config, "steps": n, "loadavg": list(os.getloadavg()),
        "train_rel_diff_median": statistics.median(rel), "train_rel_diff_max": max(rel),
        "fp32_mean_last_half": statistics.mean(a["losses"][tail]),
        "bf16_mean_last_half": statistics.mean(b["losses"][tail]),
        "val_fp32": a["val"], "val_bf16": b["val"], "val_rel_diff_max": max(vrel) if vrel else None,
        "fp32_s_per_step": a["s_per_step"], "bf16_s_per_step": b["s_per_step"],
        "speedup": a["s_per_step"] / b["s_per_step"],
    }
    lines = [*({k: v for k, v in r.items() if k != "losses"} for r in rows), summary]
    text = "\n".join(json.dumps(x) for x in lines)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
