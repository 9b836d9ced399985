"""Lesion-level mini-MIAS data set: full-resolution 128 px crops centred on the ROI coordinates (label
"lesion") vs crops of normal breast tissue from normal mammograms (label "normal"), patient = the L/R pair,
breast-tissue masks per crop (for region-guided masking).  Writes a manifest CSV."""
import csv, sys
from pathlib import Path
import numpy as np
from PIL import Image
from scipy import ndimage

SRC = Path("/work/shared/data/mammo_mini_mias")
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "mias_crops")
S = 128
(OUT / "images").mkdir(parents=True, exist_ok=True); (OUT / "masks").mkdir(exist_ok=True)
rng = np.random.default_rng(0)
rows = []
def breast(a):
    m = a > 40
    lab, n = ndimage.label(m)
    if n:
        m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(m)
def crop(a, r, c):
    r0 = int(np.clip(r - S // 2, 0, a.shape[0] - S)); c0 = int(np.clip(c - S // 2, 0, a.shape[1] - S))
    return a[r0:r0 + S, c0:c0 + S]
for row in csv.DictReader(open(SRC / "labels.csv")):
    i = row["id"]; a = np.asarray(Image.open(SRC / "images" / f"{i}.png").convert("L"))
    b = breast(a); patient = str((int(i[3:]) + 1) // 2)
    picks = []
    if row["label"] in ("benign", "malignant") and row["rois"]:
        vals = [int(v) for v in row["rois"].replace(";", ",").split(",") if v.strip()]
        for k in range(0, len(vals) - 2, 3):
            x, y = vals[k], vals[k + 1]
            picks.append(("lesion", 1024 - y, x))
    elif row["label"] == "normal":
        inner = ndimage.binary_erosion(b, iterations=S // 2)
        cand = np.argwhere(inner)
        for _ in range(2 if len(cand) else 0):
            r, c = cand[rng.integers(len(cand))]
            picks.append(("normal", r, c))
    for k, (lab, r, c) in enumerate(picks):
        name = f"{i}_{k}"
        Image.fromarray(crop(a, r, c)).save(OUT / "images" / f"{name}.png")
        Image.fromarray((crop(b, r, c) * 255).astype(np.uint8)).save(OUT / "masks" / f"{name}.png")
        rows.append({"image": f"images/{name}.png", "mask": f"masks/{name}.png", "label": lab, "patient": patient, "id": name})
with open(OUT / "manifest.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=["id", "image", "mask", "label", "patient"]); w.writeheader(); w.writerows(rows)
from collections import Counter
print(len(rows), Counter(r["label"] for r in rows))
