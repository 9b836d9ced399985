"""The real pretraining loop under its defaults, before and after they changed.

``pretrain`` (data loading, region masks, the loop) on the sample chest X-rays at 224 px,
ViT-Tiny/16 MAE with region-guided masking, batch 16, alternating:

* ``old``: ``cache=False, amp="off"`` (the earlier defaults);
* ``cache``: the decoded-image cache on (``cache=None``: on when the data fit its cap);
* ``new``: ``cache=None, amp="auto"`` (the defaults now; bf16 on an AMX CPU for this 192-wide encoder).

Seconds per step from the loop's own ``elapsed_s``, steps 4-10 of each run (the first
epoch fills the cache), and the last loss.  JSON lines.

    python benchmarks/loop_defaults.py [--rounds 2] [--steps 10] > benchmarks/results/loop-defaults-DATE.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

VARIANTS = {"old": {"cache": False, "amp": "off"}, "cache": {"cache": None, "amp": "off"},
            "new": {"cache": None, "amp": "auto"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mim-loop-defaults-"))
    os.environ["MIM_WORKBENCH_CACHE"] = str(work / "cache")
    from mim_workbench.sample import sample_root
    from mim_workbench.training import events as ev
    from mim_workbench.training.config import PretrainConfig
    from mim_workbench.training.pretrain_loop import pretrain

    root = sample_root()
    try:
        for r in range(args.rounds):
            for name, settings in VARIANTS.items():
                shutil.rmtree(work / "cache", ignore_errors=True)   # every run starts cold
                seen: list = []
                result = pretrain(PretrainConfig.from_dict(dict(
                    data=str(root / "images"), masks=str(root / "masks"), out=str(work / f"{name}-{r}"),
                    img_size=224, batch_size=16, max_steps=args.steps, epochs=1000, preview_every=0,
                    val_fraction=0.0, checkpoint_interval_s=3600, strategy="region", method="mae", **settings)),
                    on_event=seen.append)
                started = next(e for e in seen if isinstance(e, ev.Started))
                elapsed = [row["elapsed_s"] for row in result.history]
                per_step = [b - a for a, b in zip(elapsed[2:], elapsed[3:])]
                print(json.dumps({"round": r, "variant": name, **{k: v for k, v in settings.items()},
                                  "amp_used": started.amp, "step_s": statistics.median(per_step),
                                  "steps": per_step, "last_loss": result.history[-1]["loss"]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
