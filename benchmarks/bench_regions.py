"""Benchmark of automatic region proposal (mim_workbench.regions).

- **lungs**: Dice against the 232 human (V7 Labs) lung masks of
  ``../shared/data/cxr_covid_v7labs``: all images, the held-out images (NC/ND
  licences: never used to build the atlas), the atlas images, and a 5-fold
  patient-grouped cross-validation on the atlas images (atlas rebuilt without
  the fold). Mask rule: 255 = lung; 127 ("ignore": devices, markup) counts as
  background, as ``read_mask`` does; the Dice with ignore pixels left out of
  both masks is reported too. Per view (PA / AP / AP Supine) and time per image.
- **breast**: the synthetic MG phantom (known outline, pectoral wedge and
  burned-in label block) at 1600×1200 and upscaled to 4000×5000 (time), and
  plausibility on the 160 mini-MIAS films (no breast masks exist).
- **teeth**: recall of the DC1000 caries masks inside the proposed teeth
  region (pixel and lesion level), region size.
- **tissue**: a synthetic RGB slide (Dice, time).

Writes ``benchmarks/results/regions.json`` and prints a markdown table.

    PYTHONPATH=. python benchmarks/bench_regions.py [--no-cv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mim_workbench.io import read_image, read_mask  # noqa: E402
from mim_workbench.regions import dice, propose_region  # noqa: E402
from mim_workbench.regions import lungs as L  # noqa: E402

SHARED = Path(os.environ.get("MIM_SHARED_DATA") or HERE.parents[1] / "shared" / "data")
OUT = HERE / "results" / "regions.json"


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values, float)
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "min": round(float(v.min()), 4), "p10": round(float(np.percentile(v, 10)), 4),
            "max": round(float(v.max()), 4)}


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import scipy

    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "os": platform.platform(),
            "note": "shared 2-core machine, no GPU; single-threaded, timings include the resize back to full size"}


# ----------------------------------------------------------------- lungs on another collection
def bench_lungs_travel() -> dict:
    """The ``lungs`` preset on a collection its atlas never saw (children, another hospital, 299 px)."""
    root = SHARED / "cxr_lungmasks_covid19radiography"
    if not root.is_dir():
        return {"skipped": f"{root} not present"}
    per_image = []
    for image_path in sorted((root / "images").iterdir()):
        img = read_image(image_path).data
        ref = read_mask(root / "masks" / image_path.name, shape=img.shape)
        pred, dt = timed(propose_region, img, "lungs")
        per_image.append({"id": image_path.stem, "dice": round(dice(pred, ref), 4), "seconds": round(dt, 4)})
    dices = [p["dice"] for p in per_image]
    return {"dataset": f"cxr_lungmasks_covid19radiography, {len(per_image)} images (mostly children, 299 px), "
                       "COVID-QU-Ex lung masks resampled nearest to the image",
            "dice": stats(dices), "below_0.8": int(sum(d < 0.8 for d in dices)),
            "seconds_per_image": stats([p["seconds"] for p in per_image]),
            "worst": sorted(per_image, key=lambda p: p["dice"])[:8], "per_image": per_image}


def bench_propose_folder(limit: int) -> dict:
    """Images per second of ``regions propose --preset lungs`` on the 224 px two-class set."""
    import shutil
    import tempfile

    from mim_workbench.regions.folder import propose_folder

    root = SHARED / "cxr_covid19_radiography"
    if not root.is_dir():
        return {"skipped": f"{root} not present"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        for f in sorted((root / "images").rglob("*.png"))[:limit]:
            shutil.copy(f, data / f.name)
        t0 = time.perf_counter()
        workers = min(8, os.cpu_count() or 1)  # what the command uses by default
        records = list(propose_folder(data, Path(tmp) / "masks", preset="lungs", workers=workers))
        seconds = time.perf_counter() - t0
    flags: dict[str, int] = {}
    for r in records:
        flags[str(r.get("flag"))] = flags.get(str(r.get("flag")), 0) + 1
    return {"dataset": f"cxr_covid19_radiography, first {len(records)} images (224 px)", "workers": workers,
            "seconds": round(seconds, 1),
            "images_per_s": round(len(records) / seconds, 2), "flags": flags}


# ----------------------------------------------------------------- lungs
def bench_lungs(cv: bool) -> dict:
    root = SHARED / "cxr_covid_v7labs"
    if not root.is_dir():
        return {"skipped": f"{root} not present"}
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["mask_v7labs"] == "1"]
    per_image = []
    for r in rows:
        img = read_image(root / "images" / f"{r['id']}.png").data
        raw = np.asarray(Image.open(root / "masks_v7labs" / f"{r['id']}.png"))
        ref = read_mask(root / "masks_v7labs" / f"{r['id']}.png", shape=img.shape)
        pred, dt = timed(propose_region, img, "lungs")
        per_image.append({
            "id": r["id"], "view": r["view"], "license": r["license"],
            "in_atlas": "NC" not in r["license"] and "ND" not in r["license"],
            "shape": list(img.shape), "dice": round(dice(pred, ref), 4),
            "dice_ignore_excluded": round(dice(pred, raw == 255, ignore=raw == 127), 4),
            "seconds": round(dt, 4),
        })
    d = lambda sel: [p["dice"] for p in per_image if sel(p)]  # noqa: E731
    out = {
        "dataset": "cxr_covid_v7labs masks_v7labs (human, CC BY 4.0), 232 images, longest side 512 px",
        "mask_rule": "255 = lung; 127 ('ignore') = background (read_mask rule); also Dice with ignore pixels excluded",
        "atlas": {"file": f"mim_workbench/regions/{L.ATLAS_FILE}",
                  "bytes": (HERE.parent / "mim_workbench" / "regions" / L.ATLAS_FILE).stat().st_size,
                  "n_images": L.load_atlas().meta["n_images"],
                  "built_from": "the 97 masked images with CC BY / 'authorized for everyone' licences"},
        "all": stats(d(lambda p: True)),
        "all_ignore_excluded": stats([p["dice_ignore_excluded"] for p in per_image]),
        "held_out": stats(d(lambda p: not p["in_atlas"])),
        "atlas_images": stats(d(lambda p: p["in_atlas"])),
        "by_view": {v: stats(d(lambda p, v=v: p["view"] == v)) for v in sorted({p["view"] for p in per_image})},
        "seconds_per_image": stats([p["seconds"] for p in per_image]),
        "worst": sorted(per_image, key=lambda p: p["dice"])[:8],
    }
    if cv:
        out["cv_atlas_images"] = cross_validate(root, rows)
    out["per_image"] = per_image
    return out


def cross_validate(root: Path, rows: list[dict], folds: int = 5) -> dict:
    """5-fold, patient-grouped: the atlas is rebuilt without the fold's patients."""
    import build_lung_atlas as B

    perm = [r for r in rows if B.permissive(r["license"])]
    patients = sorted({r["patientid"] for r in perm})
    rng = np.random.default_rng(0)
    rng.shuffle(patients)
    fold = {p: i % folds for i, p in enumerate(patients)}
    scores = []
    for f in range(folds):
        train = [r for r in perm if fold[r["patientid"]] != f]
        atlas = L.atlas_from_arrays(B.build(root, train))
        for r in (r for r in perm if fold[r["patientid"]] == f):
            img = read_image(root / "images" / f"{r['id']}.png").data
            ref = read_mask(root / "masks_v7labs" / f"{r['id']}.png", shape=img.shape)
            scores.append(dice(L.propose_lungs(img, atlas=atlas), ref))
    return {"folds": folds, "grouped_by": "patientid", **stats(scores)}


# ----------------------------------------------------------------- breast
def bench_breast() -> dict:
    from mim_workbench.sample import mammogram_phantom, mammogram_phantom_truth

    img = np.asarray(read_image(mammogram_phantom()).data)
    h, w = img.shape
    truth = mammogram_phantom_truth(img.shape)
    outline, pect, label = truth["breast"], truth["pectoral"], truth["label"]
    m, t_small = timed(propose_region, img, "breast")
    mp, t_small_p = timed(propose_region, img, "breast", exclude_pectoral=True)
    out = {"phantom": {
        "shape": [h, w],
        "dice_outline": round(dice(m, outline), 4),
        "dice_outline_minus_pectoral_with_exclusion": round(dice(mp, outline & ~pect), 4),
        "pectoral_fraction_left_with_exclusion": round(float((mp.astype(bool) & pect & outline).sum() / (pect & outline).sum()), 4),
        "label_pixels_in_mask": int(m[label].sum() + mp[label].sum()),
        "seconds": round(t_small, 4), "seconds_with_pectoral": round(t_small_p, 4),
    }}
    big = np.asarray(Image.fromarray(img).resize((4000, 5000), Image.Resampling.BILINEAR))
    big16 = (big * 4095).astype(np.uint16)
    times = []
    for arr, pect_opt in ((big, False), (big, True), (big16, True)):
        _, dt = timed(propose_region, arr, "breast", exclude_pectoral=pect_opt)
        times.append(round(dt, 3))
    out["full_field_4000x5000"] = {"seconds_float32": times[0], "seconds_float32_pectoral": times[1],
                                   "seconds_uint16_pectoral": times[2]}
    mias = SHARED / "mammo_mini_mias" / "images"
    if mias.is_dir():
        fr, fr_p, ncomp, secs = [], [], [], []
        for f in sorted(mias.glob("mdb*.png")):
            a = np.asarray(read_image(f).data)
            m1, dt = timed(propose_region, a, "breast")
            m2 = propose_region(a, "breast", exclude_pectoral=True)
            fr.append(float(m1.mean()))
            fr_p.append(float(m2.mean()))
            ncomp.append(int(ndi.label(m1)[1]))
            secs.append(dt)
        out["mini_mias"] = {"n": len(fr), "area_fraction": stats(fr), "area_fraction_pectoral_excluded": stats(fr_p),
                            "pectoral_removed_fraction_of_breast": stats([1 - b / a for a, b in zip(fr, fr_p) if a > 0]),
                            "single_component": int(sum(c == 1 for c in ncomp)),
                            "seconds_per_image_1024": stats(secs)}
    return out


# ----------------------------------------------------------------- teeth
def bench_teeth() -> dict:
    root = SHARED / "dental_dc1000"
    if not root.is_dir():
        return {"skipped": f"{root} not present"}
    rec, lesion, frac, secs = [], [], [], []
    for f in sorted((root / "images").glob("*.png")):
        img = np.asarray(read_image(f).data)
        car = read_mask(root / "caries_masks" / f.name, shape=img.shape).astype(bool)
        m, dt = timed(propose_region, img, "teeth")
        m = m.astype(bool)
        rec.append(float((m & car).sum() / max(1, car.sum())))
        lab, n = ndi.label(car)
        if n:
            inside = np.asarray(ndi.mean(m, lab, np.arange(1, n + 1)))
            lesion.extend((inside > 0.5).tolist())
        frac.append(float(m.mean()))
        secs.append(dt)
    return {"dataset": "dental_dc1000 (100 panoramics, 1177x574; research-only, read in place)",
            "caries_pixel_recall": stats(rec),
            "caries_pixel_recall_pooled_images": "per-image recall, then statistics",
            "lesions_mostly_inside": {"n": len(lesion), "fraction": round(float(np.mean(lesion)), 4)},
            "area_fraction": stats(frac), "seconds_per_image": stats(secs)}


# ----------------------------------------------------------------- tissue
def synthetic_slide(h: int = 1500, w: int = 2400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Glass with three pink/purple tissue pieces, a dark border and a speck (as in the tests)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((500, 600, 300, 420), (900, 1700, 380, 300), (1250, 700, 120, 200)):
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = (0.94, 0.93, 0.95)
    mix = rng.random((h, w, 1)).astype(np.float32)
    stain = np.array([0.85, 0.45, 0.65], np.float32) * (1 - mix) + np.array([0.45, 0.25, 0.6], np.float32) * mix
    rgb[tissue] = stain[tissue]
    rgb += rng.normal(0, 0.02, rgb.shape).astype(np.float32)
    rgb[:, :30] = 0.05
    rgb[100:110, 1500:1520] = (0.9, 0.6, 0.7)
    return np.clip(rgb, 0, 1), tissue


def bench_tissue() -> dict:
    rgb, tissue = synthetic_slide()
    m, dt = timed(propose_region, rgb, "tissue")
    big = np.zeros((6000, 8000, 3), np.uint8)
    big[:] = (240, 238, 242)
    big[1000:4500, 1500:6000] = (200, 110, 160)
    mb, dtb = timed(propose_region, big, "tissue")
    return {"synthetic_slide": {"shape": list(tissue.shape), "dice": round(dice(m, tissue), 4), "seconds": round(dt, 4)},
            "uint8_8000x6000": {"seconds": round(dtb, 3), "area_fraction": round(float(mb.mean()), 4)}}


def markdown(res: dict) -> str:
    lu, br, te, ti = res["lungs"], res["breast"], res["teeth"], res["tissue"]
    lines = ["| preset | data | metric | value | time / image |", "|---|---|---|---|---|"]
    if "all" in lu:
        t = lu["seconds_per_image"]
        lines += [
            f"| lungs | V7 human masks, all {lu['all']['n']} | Dice mean / median / min | {lu['all']['mean']:.3f} / {lu['all']['median']:.3f} / {lu['all']['min']:.3f} | {t['mean']:.2f} s (512 px) |",
            f"| lungs | held out (not in atlas), {lu['held_out']['n']} | Dice mean / median / min | {lu['held_out']['mean']:.3f} / {lu['held_out']['median']:.3f} / {lu['held_out']['min']:.3f} | |",
            f"| lungs | atlas images, {lu['atlas_images']['n']} | Dice mean (in-sample) | {lu['atlas_images']['mean']:.3f} | |",
        ]
        if "cv_atlas_images" in lu:
            lines.append(f"| lungs | atlas images, 5-fold patient CV | Dice mean / min | {lu['cv_atlas_images']['mean']:.3f} / {lu['cv_atlas_images']['min']:.3f} | |")
        lines.append(f"| lungs | all, ignore pixels excluded | Dice mean | {lu['all_ignore_excluded']['mean']:.3f} | |")
    ph = br["phantom"]
    lines += [
        f"| breast | MG phantom 1600×1200 | Dice vs outline; label px | {ph['dice_outline']:.3f}; {ph['label_pixels_in_mask']} | {ph['seconds']:.2f} s |",
        f"| breast | phantom, `exclude_pectoral` | Dice vs outline − pectoral | {ph['dice_outline_minus_pectoral_with_exclusion']:.3f} | {ph['seconds_with_pectoral']:.2f} s |",
        f"| breast | phantom upscaled 4000×5000 | time (float32 / uint16 + pectoral) | | {br['full_field_4000x5000']['seconds_float32']:.2f} / {br['full_field_4000x5000']['seconds_uint16_pectoral']:.2f} s |",
    ]
    if "mini_mias" in br:
        mm = br["mini_mias"]
        lines.append(f"| breast | mini-MIAS {mm['n']} (no masks) | area fraction mean [min–max]; 1 component | {mm['area_fraction']['mean']:.2f} [{mm['area_fraction']['min']:.2f}–{mm['area_fraction']['max']:.2f}]; {mm['single_component']}/{mm['n']} | {mm['seconds_per_image_1024']['mean']:.2f} s |")
    if "caries_pixel_recall" in te:
        lines.append(f"| teeth | DC1000 100 | caries recall mean / median; lesions inside; area | {te['caries_pixel_recall']['mean']:.3f} / {te['caries_pixel_recall']['median']:.3f}; {te['lesions_mostly_inside']['fraction']:.3f}; {te['area_fraction']['mean']:.2f} | {te['seconds_per_image']['mean']:.2f} s |")
    lines.append(f"| tissue | synthetic slide 2400×1500 | Dice | {ti['synthetic_slide']['dice']:.3f} | {ti['synthetic_slide']['seconds']:.2f} s (8000×6000 uint8: {ti['uint8_8000x6000']['seconds']:.2f} s) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark region proposal")
    ap.add_argument("--no-cv", action="store_true", help="skip the atlas cross-validation")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--travel", action="store_true",
                    help="only the lungs preset on another collection and the folder command's speed")
    ap.add_argument("--propose-images", type=int, default=600, help="images timed through regions propose")
    args = ap.parse_args()
    if args.travel:
        res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "lungs_other_collection": bench_lungs_travel(),
               "propose_folder": bench_propose_folder(args.propose_images)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: res["lungs_other_collection"].get(k) for k in ("dice", "below_0.8")}))
        print(json.dumps(res["propose_folder"]))
        return
    t0 = time.perf_counter()
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["lungs"] = bench_lungs(cv=not args.no_cv)
    res["breast"] = bench_breast()
    res["teeth"] = bench_teeth()
    res["tissue"] = bench_tissue()
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["markdown"] = markdown(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(res["markdown"])
    print(f"\nwrote {args.out} in {res['total_seconds']} s")


if __name__ == "__main__":
    main()
