"""Large-image benchmark (not a test): first display, tiled reconstruction memory and speed.

    python benchmarks/bench_large.py [--out benchmarks/results/large.json] [--tile-model vit_tiny_patch16_224]

Measures, on a synthetic 5000x4000 12-bit MG DICOM (``mammogram_phantom``) and an
8-bit 30000x30000 pyramidal TIFF written tile by tile:

* time to first display through the napari reader: open + read the coarsest level
  and one 1024² window of level 0 (what napari fetches first), cold (pyramid built
  into an empty cache) and warm (cached);
* resident-memory growth while a whole-mammogram tiled reconstruction runs at
  level 0, measured from *after* the model is loaded (peak RSS sampled every 20 ms),
  against the target of < 2x the uint16 image (2 x 5000 x 4000 x 2 bytes);
* tiles/s of that reconstruction (ViT-Tiny/16 MAE, 224 px tiles, 25 % overlap, batch 8).

Each measurement runs in a fresh subprocess so that one does not inflate the next.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(code: str, env: dict[str, str]) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


FIRST_DISPLAY = """
import json, sys, time, psutil
import numpy as np
sys.modules["triton"] = None
t0 = time.perf_counter()
proc = psutil.Process(); rss0 = proc.memory_info().rss
from mim_workbench_napari._reader import read_layers
t_import = time.perf_counter()
(data, kwargs, kind), = read_layers(PATH)
t_open = time.perf_counter()
coarse = np.asarray(data[-1])
h, w = data[0].shape[:2]
win = np.asarray(data[0][h // 2: h // 2 + 1024, w // 2: w // 2 + 1024])
t_shown = time.perf_counter()
print(json.dumps({"open_s": t_open - t_import, "first_display_s": t_shown - t_import,
                  "levels": [list(a.shape) for a in data], "rss_growth_mb": (proc.memory_info().rss - rss0) / 2**20,
                  "built": kwargs["metadata"]["mim_workbench_pyramid"]["built"]}))
"""

TILED = """
import json, sys, threading, time, psutil, torch
torch.set_num_threads(THREADS)
from mim_workbench.io.pyramid import open_pyramid
from mim_workbench.models import ModelConfig, build_model
from mim_workbench.inference.tiled_reconstruct import reconstruct_tiled
from mim_workbench.regions.large import propose_region_large
proc = psutil.Process()
pyr = open_pyramid(PATH)
region = propose_region_large(pyr, "breast")
torch.manual_seed(0)
model = build_model(ModelConfig.from_dict(dict(model=MODEL, img_size=(224, 224), method="mae"))).eval()
with torch.no_grad():   # warm-up: allocator pools and kernels are part of "the model is loaded"
    x = torch.rand(BATCH, 1, 224, 224)
    model(x, model.make_mask("random", BATCH, 0.75))
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)
th = threading.Thread(target=sample, daemon=True); th.start()
bands = []
t0 = time.perf_counter()
first = []
def on_band(b):
    if not first: first.append(time.perf_counter() - t0)
    bands.append(b)
res = reconstruct_tiled(model, pyr, out=OUT, level=0, region_mask=region, strategy="region", overlap=0.25,
                        batch_size=BATCH, on_band=on_band)
dt = time.perf_counter() - t0
stop.set(); th.join()
peak[0] = max(peak[0], proc.memory_info().rss)
h, w = pyr.shape
print(json.dumps({"tiles": res.tiles, "seconds": dt, "tiles_per_s": res.tiles / dt, "bands": len(bands),
                  "first_band_s": first[0], "rss_growth_mb": (peak[0] - base) / 2**20,
                  "uint16_image_mb": h * w * 2 / 2**20, "target_mb": 2 * h * w * 2 / 2**20,
                  "shape": [h, w], "metrics": {k: res.metrics.get(k) for k in ("psnr", "psnr_baseline")}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"large-{time.strftime('%Y-%m-%d')}.json"))
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import _large_images as L  # noqa: E402  (synthetic 30000² TIFF writer shared with the tests)

    from mim_workbench.sample import mammogram_phantom

    work = Path(tempfile.mkdtemp(prefix="mim-bench-large-"))
    env = {**os.environ, "MIM_WORKBENCH_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    mammo = mammogram_phantom(work / "mammo.dcm", shape=(5000, 4000), spacing_mm=0.07)
    t_mammo = time.perf_counter() - t
    t = time.perf_counter()
    tiff = L.write_pyramidal_tiff(work / "slide.tif")
    t_tiff = time.perf_counter() - t

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_before": os.getloadavg()},
        "inputs": {"mammogram": "5000x4000 MG DICOM, 12 bits stored, ImagerPixelSpacing 0.07 mm",
                   "slide": "30000x30000 8-bit pyramidal TIFF, 512² zlib tiles, 6 levels",
                   "write_s": {"mammogram": t_mammo, "slide": t_tiff}},
    }
    fd = lambda p: FIRST_DISPLAY.replace("PATH", repr(str(p)))  # noqa: E731
    results["first_display"] = {
        "mammogram_cold": _child(fd(mammo), env),     # builds the pyramid into the empty cache
        "mammogram_warm": _child(fd(mammo), env),
        "slide_30000": _child(fd(tiff), env),        # the TIFF's own levels: nothing to build
    }
    code = (TILED.replace("PATH", repr(str(mammo))).replace("OUT", repr(str(work / "maps.zarr")))
            .replace("MODEL", repr(args.model)).replace("BATCH", str(args.batch)).replace("THREADS", str(args.threads)))
    results["tiled_reconstruction"] = {"model": args.model, "tile": 224, "overlap": 0.25, "batch": args.batch,
                                       "threads": args.threads, **_child(code, env)}
    results["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
