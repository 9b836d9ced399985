"""Train the shippable ``lungs`` region model and measure whether it travels.

Training data: the images of ``cxr_covid_v7labs`` that have a human (V7 Labs) lung mask
AND a licence that allows redistribution of derived data (no "NC", no "ND" in the
``license`` column: CC BY 3.0 / 4.0, CC BY-SA, "listed as authorized for everyone"),
minus ~20 % of their patients (``patientid``) held out for a same-collection check.

Measured for every variant (and for the atlas ``lungs`` preset, like for like):

  (a) Dice on the held-out permissive v7labs images (patients never trained on);
  (b) Dice on every v7labs image with a human mask not used for training, NC/ND ones
      included (measurement only: they never train anything);
  (c) Dice on all 200 images of ``cxr_lungmasks_covid19radiography`` (another hospital,
      mostly children; never trained on: its licence forbids shipping weights from it);
  (d) seconds per image of ``propose`` on 512 px images, one thread.

Mask rule: 255 = lung, 127 ("ignore") = background, as ``read_mask`` reads it.
The best variant (by mean Dice on (c)) is written to
``mim_workbench/regions/lungs_model.safetensors`` only if it beats the atlas on (c)
and is smaller than 3 MB.

    PYTHONPATH=. python benchmarks/train_lungs_model.py --variants base           # one variant
    PYTHONPATH=. python benchmarks/train_lungs_model.py --atlas-only              # the atlas numbers
    PYTHONPATH=. python benchmarks/train_lungs_model.py --report                  # merge, pick, save

Partial results (one JSON per variant, candidate models) go to ``--workdir`` so that
variants can run as separate single-threaded processes; ``--report`` merges them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mim_workbench.io import read_image, read_mask  # noqa: E402
from mim_workbench.regions import dice, propose_region  # noqa: E402
from mim_workbench.regions.learned import RegionModel, RegionModelConfig, learn_regions  # noqa: E402

SHARED = Path(os.environ.get("MIM_SHARED_DATA") or HERE.parents[1] / "shared" / "data")
V7 = SHARED / "cxr_covid_v7labs"
OTHER = SHARED / "cxr_lungmasks_covid19radiography"
SHIP = HERE.parent / "mim_workbench" / "regions" / "lungs_model.safetensors"
RESULTS = HERE / "results" / "lungs-model-2026-12-02"
MAX_BYTES = 3_000_000
TIE = 0.005  # Dice on (c): closer than this is a tie (sampling noise on 200 images is ~0.005)
ATLAS_DICE_OTHER = 0.69  # measured before (regions-travel-2026-12-02.json); re-measured here

#: name -> learn_regions settings
VARIANTS: dict[str, dict] = {
    "base": {"steps": 3000, "seconds": 900, "widths": (8, 16, 32, 64), "size": 128},
    "long": {"steps": 6000, "seconds": 1800, "widths": (8, 16, 32, 64), "size": 128},
    "wide": {"steps": 3000, "seconds": 900, "widths": (16, 32, 64, 128), "size": 128},
    "wide160": {"steps": 3000, "seconds": 900, "widths": (16, 32, 64, 128), "size": 160},
    "size160": {"steps": 3000, "seconds": 900, "widths": (8, 16, 32, 64), "size": 160},
    "smoke": {"steps": 6, "seconds": 30, "widths": (8, 16, 32, 64), "size": 128},
}


# ----------------------------------------------------------------------------- data
def permissive(licence: str) -> bool:
    """Redistribution of derived data allowed: a licence without NC or ND."""
    return bool(licence) and "NC" not in licence and "ND" not in licence


def v7_rows() -> list[dict]:
    """Rows of the v7labs labels.csv that have a human lung mask."""
    with open(V7 / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["mask_v7labs"] == "1"]


def split_by_patient(rows: list[dict], fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): about ``fraction`` of the patients held out, all their images."""
    patients = sorted({r["patientid"] for r in rows})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    held = set(patients[:max(1, round(fraction * len(patients)))])
    return [r for r in rows if r["patientid"] not in held], [r for r in rows if r["patientid"] in held]


def load_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image as float [0, 1] and its mask as uint8 {0, 1} on the image's grid."""
    img = np.asarray(read_image(image_path).data, np.float32)
    return img, read_mask(mask_path, shape=img.shape)


def v7_pairs(rows: list[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(r["id"], *load_pair(V7 / "images" / f"{r['id']}.png", V7 / "masks_v7labs" / f"{r['id']}.png"))
            for r in rows]


def other_pairs(root: Path = OTHER) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(p.stem, *load_pair(p, root / "masks" / p.name)) for p in sorted((root / "images").glob("*.png"))]


def test_sets() -> tuple[list[dict], dict[str, list]]:
    """The training rows and the three measured sets (a), (b), (c)."""
    rows = v7_rows()
    train, held = split_by_patient([r for r in rows if permissive(r["license"])])
    used = {r["id"] for r in train}
    sets = {"a_v7_held_out": v7_pairs(held),
            "b_v7_not_trained": v7_pairs([r for r in rows if r["id"] not in used]),
            "c_other_collection": other_pairs()}
    return train, sets


# ----------------------------------------------------------------------------- measuring
def stats(values: list[float]) -> dict:
    v = np.asarray(values, float)
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p10": round(float(np.percentile(v, 10)), 4), "min": round(float(v.min()), 4)}


def evaluate(propose, pairs: list) -> dict:
    """Dice statistics of ``propose(image)`` against the reference masks, worst five named."""
    scores = {name: dice(propose(img), ref) for name, img, ref in pairs}
    worst = sorted(scores.items(), key=lambda kv: kv[1])[:5]
    return {**stats(list(scores.values())), "worst": [[k, round(v, 4)] for k, v in worst]}


def seconds_per_image(propose, pairs: list, limit: int = 30) -> dict:
    """Time of ``propose`` on 512 px images (longest side), one thread, after one warm-up."""
    images = [img for _, img, _ in pairs if max(img.shape[:2]) == 512][:limit]
    propose(images[0])
    times = []
    for img in images:
        t0 = time.perf_counter()
        propose(img)
        times.append(time.perf_counter() - t0)
    return {"n": len(times), "mean": round(float(np.mean(times)), 4), "median": round(float(np.median(times)), 4),
            "max": round(float(np.max(times)), 4)}


def measure(propose, sets: dict) -> dict:
    out = {name: evaluate(propose, pairs) for name, pairs in sets.items()}
    out["d_seconds_per_image_512px"] = seconds_per_image(propose, sets["b_v7_not_trained"])
    return out


# ----------------------------------------------------------------------------- training
def train_variant(name: str, train_rows: list[dict], seed: int) -> RegionModel:
    v = VARIANTS[name]
    pairs = v7_pairs(train_rows)
    config = RegionModelConfig(size=v["size"], widths=tuple(v["widths"]), parts=2, name="lungs")
    log_every = max(1, v["steps"] // 20)

    def progress(p):
        if p.step % log_every == 0 or p.step == p.total:
            print(f"  [{name}] step {p.step}/{p.total} loss {p.loss:.3f}", flush=True)

    return learn_regions([img for _, img, _ in pairs], [m for _, _, m in pairs], config=config,
                         steps=v["steps"], seconds=v["seconds"], batch_size=8, seed=seed, on_progress=progress)


def run_variant(name: str, train_rows: list[dict], sets: dict, workdir: Path, seed: int) -> dict:
    t0 = time.monotonic()
    model = train_variant(name, train_rows, seed)
    wall = time.monotonic() - t0
    model.info.update({"variant": name, "training_images": len(train_rows),
                       "trained_on": "cxr_covid_v7labs, V7 Labs human masks, CC BY / CC BY-SA / "
                                     "'authorized for everyone' images only (no NC, no ND)"})
    path = model.save(workdir / f"{name}.safetensors")
    record = {"variant": name, "settings": {**VARIANTS[name], "batch_size": 8, "seed": seed, "parts": 2},
              "training_images": len(train_rows), "training_ids": [r["id"] for r in train_rows],
              "steps_done": model.info["steps"], "training_seconds": round(wall, 1),
              "model_file": str(path), "model_bytes": path.stat().st_size,
              **measure(RegionModel.load(path).propose, sets)}
    (workdir / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


def run_atlas(sets: dict, workdir: Path) -> dict:
    record = {"variant": "atlas (propose_region 'lungs')", **measure(lambda im: propose_region(im, "lungs"), sets)}
    (workdir / "atlas.json").write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "threads": 1, "torch": torch.__version__,
            "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "note": "shared 2-core machine; each variant trained in its own single-threaded process, "
                    "sometimes next to another single-threaded job"}


def pick_and_ship(records: list[dict], atlas: dict) -> dict:
    """The best variant by mean Dice on (c) (the smallest file among those within ``TIE`` of the
    top: a tie is no reason to ship a bigger, slower model); shipped only if it beats the atlas."""
    top = max(r["c_other_collection"]["mean"] for r in records)
    best = min((r for r in records if r["c_other_collection"]["mean"] >= top - TIE), key=lambda r: r["model_bytes"])
    atlas_c = atlas["c_other_collection"]["mean"]
    beats = best["c_other_collection"]["mean"] > atlas_c
    small = best["model_bytes"] < MAX_BYTES
    decision = {"best_variant": best["variant"], "selected_by": f"mean Dice on (c); smallest file within {TIE} of the top",
                "best_c_mean": best["c_other_collection"]["mean"], "atlas_c_mean": atlas_c,
                "margin": round(best["c_other_collection"]["mean"] - atlas_c, 4), "beats_atlas": beats,
                "bytes": best["model_bytes"], "under_3MB": small, "shipped_to": None}
    if beats and small:
        ship(best)
        decision["shipped_to"] = str(SHIP.relative_to(HERE.parent))
        decision["shipped_bytes"] = SHIP.stat().st_size
    return decision


def ship(record: dict) -> None:
    """Write the chosen model to the package with its attribution (every training image,
    its licence and URL; the masks' licence) and its measured Dice in the file's metadata."""
    model = RegionModel.load(record["model_file"])
    by_id = {r["id"]: r for r in v7_rows()}
    model.info.update({
        "built_by": "benchmarks/train_lungs_model.py",
        "masks": "V7 Labs / CloudFactory human lung annotations, github.com/v7labs/covid-19-xray-dataset, CC BY 4.0",
        "images": "COVID-19 image data collection (Cohen et al., arXiv:2003.11597), "
                  "github.com/ieee8023/covid-chestxray-dataset; only CC BY / CC BY-SA / 'authorized for everyone'",
        "sources": [{"id": i, "license": by_id[i]["license"], "url": by_id[i]["url"]} for i in record["training_ids"]],
        "dice": {k: record[k]["mean"] for k in ("a_v7_held_out", "b_v7_not_trained", "c_other_collection")},
    })
    model.save(SHIP).chmod(0o644)  # safetensors writes 0600


def cell(m: dict) -> str:
    return f"{m['mean']:.3f} / {m['median']:.3f}"


def markdown(report: dict) -> str:
    lines = ["# Learned `lungs` region model, 2026-12-02", "",
             f"Machine: {report['machine']['cpu']}, 1 thread, torch {report['machine']['torch']}, "
             f"{report['machine']['date']}.", "",
             "Dice mean / median. (a) held-out v7labs patients (permissive licences, "
             f"n={report['atlas']['a_v7_held_out']['n']}); (b) every v7labs image with a human mask not "
             f"trained on, NC/ND included (n={report['atlas']['b_v7_not_trained']['n']}); (c) "
             f"cxr_lungmasks_covid19radiography, never trained on (n={report['atlas']['c_other_collection']['n']}); "
             "(d) seconds per image of propose on 512 px images, 1 thread.", "",
             "| variant | training images | steps | training s | (a) | (b) | (c) | (d) s/img | file bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        lines.append(f"| {r['variant']} ({_desc(r['settings'])}) | {r['training_images']} | {r['steps_done']} | "
                     f"{r['training_seconds']:.0f} | {cell(r['a_v7_held_out'])} | {cell(r['b_v7_not_trained'])} | "
                     f"{cell(r['c_other_collection'])} | {r['d_seconds_per_image_512px']['mean']:.3f} | "
                     f"{r['model_bytes']} |")
    a = report["atlas"]
    lines.append(f"| atlas preset | 97 (atlas) | – | – | {cell(a['a_v7_held_out'])} | {cell(a['b_v7_not_trained'])} | "
                 f"{cell(a['c_other_collection'])} | {a['d_seconds_per_image_512px']['mean']:.3f} | – |")
    lines += ["", "The atlas was built from all 97 permissive images, so its (a) and the 21 held-out images "
              "inside its (b) are images it has seen; only its (c) is a like-for-like comparison."]
    d = report["decision"]
    lines += ["", f"Best on (c): **{d['best_variant']}**, {d['best_c_mean']:.3f} vs atlas {d['atlas_c_mean']:.3f} "
              f"({d['margin']:+.3f}); shipped: {d['shipped_to'] or 'no'} "
              f"({d.get('shipped_bytes', d['bytes'])} bytes with its attribution metadata)."]
    if report.get("note"):
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def _desc(s: dict) -> str:
    return f"{s['steps']} steps/{s['seconds']} s, widths {tuple(s['widths'])}, {s['size']} px"


def report(workdir: Path, note: str = "") -> dict:
    records = [json.loads(p.read_text()) for p in sorted(workdir.glob("*.json")) if p.stem != "atlas"]
    records = [r for r in records if r["variant"] != "smoke"]
    atlas = json.loads((workdir / "atlas.json").read_text())
    out = {"what": "learned lungs region model (RegionModel, parts=2) trained on permissive v7labs images",
           "machine": machine(), "atlas_dice_other_before": ATLAS_DICE_OTHER, "note": note,
           "decision": pick_and_ship(records, atlas), "atlas": atlas, "variants": records}
    RESULTS.with_suffix(".json").write_text(json.dumps(out, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(out))
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--atlas-only", action="store_true", help="measure only the atlas preset")
    ap.add_argument("--report", action="store_true", help="merge the workdir's results, pick, save, write")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lungs-model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="a paragraph for the report (findings, caveats)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(markdown(report(args.workdir, args.note)))
        return
    train_rows, sets = test_sets()
    print(f"training images {len(train_rows)}; " + ", ".join(f"{k}: {len(v)}" for k, v in sets.items()), flush=True)
    if args.atlas_only:
        print(json.dumps({k: v for k, v in run_atlas(sets, args.workdir).items()}, indent=1))
        return
    for name in args.variants.split(","):
        rec = run_variant(name, train_rows, sets, args.workdir, args.seed)
        print(json.dumps({k: v for k, v in rec.items() if k != "training_ids"}, indent=1), flush=True)


if __name__ == "__main__":
    main()
