"""Shared tiny settings for the training / checkpoint / CLI tests (not a test module).

A 2-block, 64-wide ViT on 64 px images of the bundled sample chest X-rays: a few
steps take about a second on a laptop CPU.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SAMPLE_IMAGES = SAMPLE / "images"
SAMPLE_MASKS = SAMPLE / "masks"

TINY_MODEL: dict[str, Any] = {
    "img_size": 64, "embed_dim": 64, "depth": 2, "num_heads": 2,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
}


def tiny(out: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """PretrainConfig keyword arguments of a tiny run on the sample data."""
    values: dict[str, Any] = {
        "data": str(SAMPLE_IMAGES), "masks": str(SAMPLE_MASKS), **TINY_MODEL,
        "batch_size": 4, "epochs": 2, "threads": 2, "preview_every": 0, "seed": 0,
    }
    if out is not None:
        values["out"] = str(out)
    values.update(overrides)
    return values


def tiny_cli_flags() -> list[str]:
    return ["--img-size", "64", "--embed-dim", "64", "--depth", "2", "--num-heads", "2",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--batch-size", "4", "--threads", "2", "--preview-every", "0"]


def fill_pretrain_dock(w: Any, data: str | Path, out: str | Path, *, epochs: int) -> None:
    """Set a Pretrain dock ``w`` for a tiny CPU run (64 px, batch 4) on ``data`` into ``out``."""
    w.data.value = str(data)
    w.out.value = str(out)
    w.img_size.value = 64
    w.epochs.value = epochs
    w.batch.value = 4
    w.device.value = "cpu"


def tiny_classifier(out: str | Path, data: str | Path = SAMPLE, *, epochs: int = 2) -> str:
    """A linear probe on a tiny scratch encoder (64 px, patch 8) of ``data``: its checkpoint."""
    from mim_workbench.training.finetune import FinetuneConfig, finetune

    result = finetune(FinetuneConfig.from_dict(dict(data=str(data), out=str(out), mode="probe", epochs=epochs, img_size=(64, 64),
                                     patch_size=8, embed_dim=32, depth=1, num_heads=2, device="cpu", threads=1)))
    return str(result.checkpoint)


def split_collection(root: Path) -> tuple[Path, Path]:
    """The sample collection cut in two by patient: a labelled set and an 'external' one."""
    rows = list(csv.DictReader(open(SAMPLE / "labels.csv")))
    parts = {"labelled": [], "external": []}
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    for members in by_class.values():
        for k, r in enumerate(members):
            parts["external" if k % 3 == 0 else "labelled"].append(r)
    out = []
    for name, members in parts.items():
        d = root / name
        (d / "images").mkdir(parents=True)
        for r in members:
            shutil.copy(SAMPLE / "images" / f"{r['id']}.png", d / "images" / f"{r['id']}.png")
        with open(d / "labels.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(members)
        out.append(d)
    return out[0], out[1]
