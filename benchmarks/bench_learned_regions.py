"""Learning curve of learned regions: Dice after learning from n painted examples.

For each lung-mask collection (v7labs human masks; cxr_lungmasks_covid19radiography), for
n in 1, 3, 5, 10 examples and several seeds (each seed draws other examples), a region
model is learned with the product's default budget (``learn_regions(..., seconds=110,
steps=600)``, batch 8, ``parts=2`` as the GUI sets for "lungs", one thread) and scored by
mean Dice on 40 other images of the same collection. The test set is fixed per collection
and disjoint from every example (v7labs: whole patients, by ``patientid``); the examples of
a seed are nested (the n=3 draw contains the n=1 draw, and so on).

Benchmark only: no model from here is shipped (the second collection's licence forbids it).

    PYTHONPATH=. python benchmarks/bench_learned_regions.py --seeds 0,1            # runs
    PYTHONPATH=. python benchmarks/bench_learned_regions.py --report               # table

Each run appends one JSON line to ``--workdir``/runs-<tag>.jsonl, so that runs can be
split over single-threaded processes; ``--report`` merges them into
``benchmarks/results/learned-regions-2026-12-02.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import train_lungs_model as T  # noqa: E402  (data loading, Dice, machine info)

from mim_workbench.regions import dice  # noqa: E402
from mim_workbench.regions.learned import RegionModelConfig, learn_regions  # noqa: E402

RESULTS = HERE / "results" / "learned-regions-2026-12-02"
TEST_SIZE = 40
COLLECTIONS = ("v7labs", "covid19radiography")


# ----------------------------------------------------------------------------- data
def v7_split(test_size: int = TEST_SIZE) -> tuple[list, list]:
    """(pool, test): whole patients drawn into the test set until it holds ``test_size`` images."""
    rows = T.v7_rows()
    patients = sorted({r["patientid"] for r in rows})
    np.random.default_rng(0).shuffle(patients)
    test_ids: list[str] = []
    for p in patients:
        ids = [r["id"] for r in rows if r["patientid"] == p]
        if len(test_ids) + len(ids) <= test_size:
            test_ids += ids
        if len(test_ids) == test_size:
            break
    test = [r for r in rows if r["id"] in test_ids]
    return T.v7_pairs([r for r in rows if r["id"] not in test_ids]), T.v7_pairs(test)


def other_split(test_size: int = TEST_SIZE) -> tuple[list, list]:
    """(pool, test): a fixed random ``test_size`` images as test set (no patient ids known)."""
    pairs = T.other_pairs()
    order = np.random.default_rng(0).permutation(len(pairs))
    test = set(order[:test_size].tolist())
    return [p for i, p in enumerate(pairs) if i not in test], [p for i, p in enumerate(pairs) if i in test]


def split(collection: str) -> tuple[list, list]:
    return v7_split() if collection == "v7labs" else other_split()


def draw(pool: list, n: int, seed: int) -> list:
    """The first ``n`` of a seed's permutation of the pool (nested over n)."""
    order = np.random.default_rng(1000 + seed).permutation(len(pool))
    return [pool[i] for i in order[:n]]


# ----------------------------------------------------------------------------- one run
def run_one(collection: str, pool: list, test: list, n: int, seed: int, steps: int, seconds: float) -> dict:
    examples = draw(pool, n, seed)
    t0 = time.monotonic()
    model = learn_regions([img for _, img, _ in examples], [m for _, _, m in examples],
                          config=RegionModelConfig(parts=2, name="lungs"), steps=steps, seconds=seconds, seed=seed)
    learn_s = time.monotonic() - t0
    scores = [dice(model.propose(img), ref) for _, img, ref in test]
    return {"collection": collection, "n": n, "seed": seed, "examples": [name for name, _, _ in examples],
            "steps_done": model.info["steps"], "learn_seconds": round(learn_s, 1),
            "dice_mean": round(float(np.mean(scores)), 4), "dice_median": round(float(np.median(scores)), 4),
            "dice_min": round(float(np.min(scores)), 4), "test_n": len(test)}


def run_all(args: argparse.Namespace) -> None:
    out = args.workdir / f"runs-{args.tag}.jsonl"
    splits = {c: split(c) for c in args.collections.split(",")}
    for c, (pool, test) in splits.items():
        print(f"{c}: pool {len(pool)}, test {len(test)}", flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: a cut run leaves whole seeds
        for collection, (pool, test) in splits.items():
            for n in (int(k) for k in args.n.split(",")):
                rec = run_one(collection, pool, test, n, seed, args.steps, args.seconds)
                print(json.dumps({k: v for k, v in rec.items() if k != "examples"}), flush=True)
                with open(out, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- report
def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for collection in COLLECTIONS:
        for n in sorted({r["n"] for r in runs if r["collection"] == collection}):
            sel = [r for r in runs if r["collection"] == collection and r["n"] == n]
            d = np.array([r["dice_mean"] for r in sel])
            rows.append({"collection": collection, "n": n, "seeds": sorted(r["seed"] for r in sel),
                         "dice_mean": round(float(d.mean()), 4),
                         "dice_sd": round(float(d.std(ddof=1)), 4) if len(d) > 1 else None,
                         "learn_seconds_mean": round(float(np.mean([r["learn_seconds"] for r in sel])), 1),
                         "steps_mean": round(float(np.mean([r["steps_done"] for r in sel])), 1)})
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Learned regions: learning curve, 2026-12-02", "",
             f"Machine: {m['cpu']}, 1 thread, torch {m['torch']}, {m['date']}. Budget per model: "
             f"learn_regions(seconds={report['budget']['seconds']}, steps={report['budget']['steps']}), batch 8, "
             f"parts=2. Test: {TEST_SIZE} fixed images per collection, disjoint from all examples.", "",
             "| collection | n examples | Dice mean ± sd over seeds | seeds | learning s | steps |",
             "|---|---|---|---|---|---|"]
    for r in report["summary"]:
        sd = f" ± {r['dice_sd']:.3f}" if r["dice_sd"] is not None else ""
        lines.append(f"| {r['collection']} | {r['n']} | {r['dice_mean']:.3f}{sd} | {len(r['seeds'])} | "
                     f"{r['learn_seconds_mean']:.0f} | {r['steps_mean']:.0f} |")
    return "\n".join(lines + ["", report["note"]]) + "\n"


def report(args: argparse.Namespace) -> dict:
    runs = [json.loads(line) for p in sorted(args.workdir.glob("runs-*.jsonl")) for line in p.read_text().splitlines()]
    seeds = sorted({r["seed"] for r in runs})
    out = {"what": "learning curve of learn_regions on two lung-mask collections",
           "machine": T.machine(), "budget": {"seconds": args.seconds, "steps": args.steps, "batch_size": 8},
           "collections": {"v7labs": "cxr_covid_v7labs, human V7 masks (all licences: benchmark only); test by patient",
                           "covid19radiography": "cxr_lungmasks_covid19radiography, 200 images, mostly children"},
           "note": f"Seeds run: {seeds}. " + args.note,
           "summary": summary(runs), "runs": runs}
    RESULTS.with_suffix(".json").write_text(json.dumps(out, indent=1))
    RESULTS.with_suffix(".md").write_text(markdown(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collections", default=",".join(COLLECTIONS))
    ap.add_argument("--n", default="1,3,5,10", help="numbers of examples")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=110.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/learned-regions"))
    ap.add_argument("--tag", default="main", help="name of this process's runs file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="merge the runs and write the results")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. why a seed is missing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(markdown(report(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
