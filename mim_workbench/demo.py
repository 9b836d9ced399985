"""``mim-workbench demo``: a headless end-to-end run on the bundled sample data.

Pretrains a small model with region-guided masking on the sample chest X-rays for a short
time budget, reconstructs an X-ray held back from training, and writes pictures plus
metrics. This is what ``mim-workbench gui`` runs where no display exists.

The demo model is the ``quick-cpu`` preset (:data:`mim_workbench.training.config.PRESETS`),
sized so that a laptop CPU learns something visible within a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def run_demo(out: Path, *, seconds: float = 60.0, device: str = "auto") -> dict:
    """Pretrain for ``seconds`` on the sample data, reconstruct the held-back X-ray, and write ``run/``,
    ``reconstruction/``, ``demo.png`` and ``demo.json`` under ``out``; returns (and prints) that JSON summary
    (checkpoint, image, reconstruction metrics, picture paths)."""
    from .inference.reconstruct import reconstruct
    from .io.datasets import discover
    from .training import PretrainConfig, pretrain
    from .training.progress import ProgressPrinter
    from .training.runner import default_threads
    from .sample import sample_root

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = sample_root()
    index = discover(data)
    held_out = index.samples[-1]
    config = PretrainConfig.preset_config(
        "quick-cpu", data=str(data), out=str(out / "run"), epochs=400, time_budget_s=seconds,
        threads=default_threads(), preview_every=0, checkpoint_every=100_000,
        device=device, seed=0, exclude_ids=[held_out.id],
    )
    print(f"demo: pretraining with region-guided masking for {seconds:.0f} s on {len(index.samples) - 1} "
          f"sample chest X-rays (held back: {held_out.id})", file=sys.stderr)
    result = pretrain(config, on_event=ProgressPrinter())
    rec = reconstruct(result.last_checkpoint, held_out.image, region_mask=held_out.mask, seed=0)
    paths = rec.save(out / "reconstruction")
    _montage(rec, out / "demo.png")
    summary = {"checkpoint": str(result.last_checkpoint), "image": str(held_out.image), **rec.metrics,
               "pictures": [str(p) for p in paths] + [str(out / "demo.png")]}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def _montage(rec, path: Path, zoom: int = 4) -> None:
    """input | masked | reconstruction + visible | error, enlarged with visible pixels kept square."""
    from PIL import Image

    tiles = [rec.image, rec.masked, rec.recon_plus_visible, rec.error / max(1e-6, float(rec.error.max()))]
    gap = np.ones((rec.image.shape[0], 1), np.float32)
    row = np.concatenate([x for t in tiles for x in (np.clip(t, 0, 1), gap)][:-1], axis=1)
    img = Image.fromarray((row * 255).astype(np.uint8))
    img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(path)
