"""Build ``mim_workbench/regions/lung_atlas.npz``: the 64×64 mean chest X-ray template
and lung probability atlas used by the ``lungs`` region preset.

Only images whose licence permits redistribution of derived data are used: rows of
``cxr_covid_v7labs/labels.csv`` with a human V7 lung mask and no NC / ND in the
licence (CC BY 3.0, CC BY 4.0, "listed as authorized for everyone"). The V7 Labs
masks themselves are CC BY 4.0. Every source image, its licence and URL are
recorded in the file's ``meta`` (attribution), and images used here are excluded
from the "held-out" Dice in ``benchmarks/bench_regions.py``.

Each image is reduced exactly as at run time (``lungs.prepare``), its lung box (from
the human mask; 255 = lung, 127 "ignore" counts as background) is mapped to
[0.2, 0.8]×[0.2, 0.8] of the 64×64 frame, and the frame is sampled from the
equalised image (template) and from the mask (probability). Stored as uint8 (×255).

    PYTHONPATH=. python benchmarks/build_lung_atlas.py [--data ../shared/data/cxr_covid_v7labs]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mim_workbench.io import read_image
from mim_workbench.regions import lungs as L
from mim_workbench.regions import morphology as M

F = 64
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "cxr_covid_v7labs"
OUT = HERE.parent / "mim_workbench" / "regions" / L.ATLAS_FILE


def permissive(licence: str) -> bool:
    return bool(licence) and "NC" not in licence and "ND" not in licence


def atlas_rows(data: Path) -> list[dict]:
    with open(data / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if r["mask_v7labs"] == "1" and permissive(r["license"])]


def lung_box_params(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    cy = (rows[0] + rows[-1] + 1) / 2
    cx = (cols[0] + cols[-1] + 1) / 2
    box = (L.BOX_HI - L.BOX_LO) * F
    return (cx, cy, (cols[-1] + 1 - cols[0]) / box, (rows[-1] + 1 - rows[0]) / box, 0.0)


def build(data: Path, rows: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The atlas arrays from ``rows`` of labels.csv (default: all permissive rows)."""
    rows = atlas_rows(data) if rows is None else rows
    tsum = np.zeros((F, F))
    tcount = np.zeros((F, F))
    psum = np.zeros((F, F))
    log_aspect, log_width = [], []
    for r in rows:
        img = np.asarray(read_image(data / "images" / f"{r['id']}.png").data, np.float32)
        raw = np.asarray(Image.open(data / "masks_v7labs" / f"{r['id']}.png"))
        g, eq, valid = L.prepare(img)
        mask = M.resize((raw > 127).astype(np.float32), g.shape) >= 0.5  # 127 = ignore -> background
        p = lung_box_params(mask)
        e = L.sample_frame(np.where(valid, eq, np.nan).astype(np.float32), p, F)
        ok = np.isfinite(e)
        tsum[ok] += e[ok]
        tcount[ok] += 1
        psum += L.sample_frame(mask.astype(np.float32), p, F, cval=0.0)
        log_aspect.append(np.log(p[3] / p[2]))
        log_width.append(np.log(p[2] * (L.BOX_HI - L.BOX_LO) * F / g.shape[1]))
    n = len(rows)
    template = tsum / np.maximum(tcount, 1)
    meta = {
        "what": "64x64 mean equalised chest X-ray template and lung probability atlas for mim_workbench.regions.lungs",
        "frame": {"size": F, "lung_box": [L.BOX_LO, L.BOX_HI], "work_size": L.WORK_SIZE},
        "n_images": n,
        "built_by": "benchmarks/build_lung_atlas.py",
        "masks": "V7 Labs / CloudFactory human lung annotations, github.com/v7labs/covid-19-xray-dataset, CC BY 4.0",
        "images": "COVID-19 image data collection (Cohen et al., arXiv:2003.11597), github.com/ieee8023/covid-chestxray-dataset; "
                  "only CC BY / 'authorized for everyone' images (no NC, no ND)",
        "sources": [{"id": r["id"], "license": r["license"], "url": r["url"]} for r in rows],
    }
    return {
        "template": np.round(np.clip(template, 0, 1) * 255).astype(np.uint8),
        "coverage": np.round(tcount / n * 255).astype(np.uint8),
        "prob": np.round(psum / n * 255).astype(np.uint8),
        "stats": np.array([np.mean(log_aspect), np.std(log_aspect), np.mean(log_width), np.std(log_width)]),
        "meta": np.array(json.dumps(meta)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    arrays = build(args.data)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) from {json.loads(str(arrays['meta']))['n_images']} images")


if __name__ == "__main__":
    main()
