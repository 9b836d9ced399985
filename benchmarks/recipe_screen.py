#!/usr/bin/env python
"""Screen short pretraining recipes by their linear-probe AUC gain over a random encoder.

For each recipe: ``mim-workbench pretrain`` for a fixed time budget on an unlabelled pool,
then ``mim-workbench finetune --mode probe`` from the checkpoint at a few label fractions
and seeds, on the pool's own labelled collection and on a transfer task.  A randomly
initialised encoder of the same architecture (``--checkpoint scratch``) is the baseline.

Held-out test images never enter the pretraining pool.  ``finetune`` has no option for an
explicit split: it splits by patient with a seeded, order-independent function
(``mim_workbench.io.datasets.patient_split``, val 0.15 / test 0.2, ``--split-seed 0``).
This script calls that same function once on the labelled collection, writes the test ids
to ``WORK/test_ids.txt`` and builds ``WORK/pool/`` from symlinks to all *other* images.
Finetune runs then use the untouched collection with the default split, and every run's
test ids (its checkpoint's ``meta.json``) are checked against ``test_ids.txt`` (the run is rejected when
they differ).

    python benchmarks/recipe_screen.py --recipes defaults,blr1.5e-3 --seeds 0,1,2
    python benchmarks/recipe_screen.py --code /tmp/snap   # a `git archive COMMIT mim_workbench` copy
    python benchmarks/recipe_screen.py --report-only     # tables from the JSONL

Runs whose output already exists are not repeated (metrics are re-read), so the script
can be stopped and restarted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path.home() / ".local/share/mim-workbench/venv/bin"

#: name -> extra pretrain flags.  "scratch" has no pretraining.
RECIPES: dict[str, list[str]] = {
    "scratch": [],
    "defaults": [],
    "blr1.5e-3": ["--blr", "1.5e-3"],
    "blr1.5e-3-112px": ["--blr", "1.5e-3", "--img-size", "112"],
    "blr5e-3-warmup0.25": ["--blr", "5e-3", "--warmup-epochs", "0.25"],
    "blr5e-3-warmup0.25-112px": ["--blr", "5e-3", "--warmup-epochs", "0.25", "--img-size", "112"],
    "simmim-blr1.5e-3": ["--method", "simmim", "--blr", "1.5e-3"],
    "blr1.5e-3-ratio0.6": ["--blr", "1.5e-3", "--ratio", "0.6"],
    "blr1.5e-3-112px-ratio0.6": ["--blr", "1.5e-3", "--img-size", "112", "--ratio", "0.6"],
    "scratch-112px": [],
    # Schedules planned to end with the time budget (the loop does so whenever --time-budget is
    # given; --epochs 200 only bounds it): the budget, not an epoch count, decides the length.
    "planned-blr1.5e-3-112px": ["--blr", "1.5e-3", "--img-size", "112", "--epochs", "200"],
    "planned-sqrt-blr4e-4-112px": ["--lr-scaling", "sqrt", "--blr", "4e-4", "--img-size", "112", "--epochs", "200"],
    "planned-sqrt-blr8e-4-112px": ["--lr-scaling", "sqrt", "--blr", "8e-4", "--img-size", "112", "--epochs", "200"],
    "planned-sqrt-blr4e-4-112px-patch8": ["--lr-scaling", "sqrt", "--blr", "4e-4", "--img-size", "112",
                                          "--patch-size", "8", "--epochs", "200"],
    "planned-sqrt-blr4e-4-64px-patch8": ["--lr-scaling", "sqrt", "--blr", "4e-4", "--img-size", "64",
                                         "--patch-size", "8", "--epochs", "400"],
    "planned-simmim-sqrt-blr4e-4-112px": ["--method", "simmim", "--lr-scaling", "sqrt", "--blr", "4e-4",
                                          "--img-size", "112", "--epochs", "200"],
    "scratch-112px-patch8": [],
    "scratch-64px-patch8": [],
}
#: scratch baselines probe a random encoder with these finetune flags
SCRATCH_FLAGS = {"scratch": [], "scratch-112px": ["--img-size", "112"],
                 "scratch-112px-patch8": ["--img-size", "112", "--patch-size", "8"],
                 "scratch-64px-patch8": ["--img-size", "64", "--patch-size", "8"]}


def scratch_for(recipe: str) -> str:
    """The random-encoder baseline with the recipe's input size and patch size."""
    for size in ("64px-patch8", "112px-patch8", "112px"):
        if size in recipe:
            return f"scratch-{size}"
    return "scratch"


def cli(code: Path | None = None) -> list[str]:
    """The mim-workbench command; with ``code``, that source tree's (on PYTHONPATH, see screen)."""
    exe = VENV_BIN / "mim-workbench"
    if code is None and exe.exists():
        return [str(exe)]
    py = VENV_BIN / "python"
    return [str(py if py.exists() else sys.executable), "-c",
            "import sys; from mim_workbench.cli import main; sys.exit(main())"]


def build_split(data: Path, work: Path) -> list[str]:
    """Write WORK/test_ids.txt (finetune's own test split) and WORK/pool/ (everything else)."""
    ids_file, pool = work / "test_ids.txt", work / "pool"
    if ids_file.exists() and pool.is_dir():
        return ids_file.read_text().split()
    from mim_workbench.io.datasets import discover, patient_split
    samples = discover(data).samples
    split = patient_split(samples, val=0.15, test=0.2, seed=0)   # finetune's defaults
    test = sorted(s.id for s in split["test"])
    pool.mkdir(parents=True, exist_ok=True)
    for s in split["train"] + split["val"]:
        link = pool / s.image.name
        if not link.exists():
            link.symlink_to(s.image)
    ids_file.write_text("\n".join(test) + "\n")
    return test


def run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    t0 = time.time()
    with open(log, "w") as fh:
        # cwd outside any checkout: `python -c` puts the cwd first on sys.path
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=env.get("PYTHONPATH") or None)
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)} (log {log})")
    return time.time() - t0


def pretrain(name: str, args, env) -> dict:
    """Pretrain a recipe (once) and return steps, final loss and the lr it used."""
    rd = args.work / "runs" / name
    log = args.work / "runs" / f"{name}.log"
    info_file = rd / "recipe.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    cmd = cli(args.code) + ["pretrain", "--data", str(args.work / "pool"), "--out", str(rd),
                   "--time-budget", str(args.budget), "--threads", str(args.threads),
                   "--preview-every", "0", "--seed", "0"] + RECIPES[name]
    # a finished run (checkpoint written) is reused, e.g. one started by hand with the same command
    finished = (rd / "latest").exists() or any(rd.glob("ckpt-*"))
    wall = None if finished else run(cmd, log, env)
    cfg = json.loads((rd / "config.json").read_text())
    with open(rd / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r.get("loss")]
    last = train_rows[-1]
    vals = [r for r in rows if r.get("val_loss")]
    info = {"recipe": name, "flags": RECIPES[name], "pretrain_steps": int(last["step"]),
            "final_loss": float(last["loss"]), "final_val_loss": float(vals[-1]["val_loss"]) if vals else None,
            "lr_peak": float(log.read_text().split(" lr ")[1].split()[0].rstrip(",")) if " lr " in log.read_text()
            else cfg.get("lr") or float(cfg["blr"]) * int(cfg["batch_size"]) * int(cfg.get("accum_steps", 1)) / 256,
            "lr_last": float(last["lr"]), "epochs_scheduled": cfg.get("epochs"),
            "img_size": cfg.get("img_size"), "train_s": float(last["elapsed_s"]),
            "pretrain_wall_s": round(wall, 1) if wall else None,
            "median_img_per_s": statistics.median(float(r["images_per_s"]) for r in train_rows),
            "pretrain_log_head": log.read_text().splitlines()[0]}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def probe(name: str, source: list[str], task: str, data: Path, fraction: float, seed: int,
          args, env, test_ids: list[str] | None, pool: str = "token") -> dict:
    tail = "" if pool == "token" else f"-{pool}"
    out = args.work / "runs" / name / "ft" / f"{task}-f{fraction:g}-s{seed}{tail}"
    mfile = out / "metrics.json"
    wall = None
    if not mfile.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = cli(args.code) + ["finetune", "--mode", "probe", "--data", str(data), "--out", str(out),
                       "--fraction", str(fraction), "--seed", str(seed), "--split-seed", "0",
                       "--threads", str(args.threads), "--pool", pool, "--quiet"] + source
        wall = round(run(cmd, out.parent / f"{out.name}.log", env), 1)
    m = json.loads(mfile.read_text())
    # the split is recorded in the checkpoint's meta.json, not in metrics.json
    meta = json.loads((Path(m["checkpoint"]) / "meta.json").read_text())
    if test_ids is not None and sorted(meta["splits"]["test"]) != test_ids:
        raise RuntimeError(f"{out}: test split differs from the held-out list")
    met = m.get("metrics", {})
    return {"task": task, "fraction": fraction, "seed": seed, "auc": met.get("auc", m.get("auc")),
            "ap": met.get("ap"), "accuracy": met.get("accuracy"),
            "balanced_accuracy": met.get("balanced_accuracy"), "n_train": m.get("n_train"),
            "n_test": m.get("n_test"), "split": m.get("split"), "probe_wall_s": wall, "run": str(out)}


def screen(args) -> None:
    env = {**os.environ, "MIM_WORKBENCH_CACHE": str(args.work / "cache"),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.code:   # a frozen copy of the package (e.g. `git archive COMMIT mim_workbench | tar -x -C DIR`)
        env["PYTHONPATH"] = str(args.code)
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    test_ids = build_split(args.covid, args.work)
    tasks = [("covid19", args.covid, args.fractions, test_ids),
             ("kermany", args.kermany, args.kermany_fractions, None)]
    done = {(r["recipe"], r["task"], r["fraction"], r["seed"]) for r in read_jsonl(args.jsonl)}
    for name in args.recipes:
        for pool in args.pools:
            _screen_recipe(name, pool, args, env, tasks, done)


def _screen_recipe(name: str, pool: str, args, env, tasks, done) -> None:
    """Pretrain one recipe (once) and probe it with one pooling; rows are named RECIPE+POOL
    for pools other than the class token."""
    label = name if pool == "token" else f"{name}+{pool}"
    if name in SCRATCH_FLAGS:
        info = {"recipe": name, "flags": SCRATCH_FLAGS[name], "pretrain_steps": 0, "final_loss": None,
                "lr_peak": None}
        source = ["--checkpoint", "scratch"] + SCRATCH_FLAGS[name]
    else:
        info = pretrain(name, args, env)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {info['pretrain_steps']} steps, "
              f"loss {info['final_loss']:.4f}, lr {info['lr_peak']:.3g}", flush=True)
        source = ["--checkpoint", str(args.work / "runs" / name)]
    for seed in args.seeds:
        for task, data, fractions, ids in tasks:
            for fraction in fractions:
                if (label, task, fraction, seed) in done:
                    continue
                row = {**info, "recipe": label, "pool": pool,
                       **probe(name, source, task, data, fraction, seed, args, env, ids, pool)}
                print(f"[{time.strftime('%H:%M:%S')}]   {task} f={fraction:g} seed {seed}: "
                      f"AUC {row['auc']:.4f} ({row['probe_wall_s']} s)", flush=True)
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                done.add((label, task, fraction, seed))


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(rows: list[dict]) -> str:
    """Markdown tables: recipe x fraction, mean +- sd AUC over seeds and gain over scratch."""
    def cell(vals):
        if not vals:
            return "", None
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{mean:.3f} ± {sd:.3f} (n={len(vals)})", mean

    out = []
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    for task in dict.fromkeys(r["task"] for r in rows):
        fracs = sorted({r["fraction"] for r in rows if r["task"] == task})
        # baseline AUC per (fraction, seed): scratch of the same input size (scratch-112px for 112 px recipes)
        base = {(r["recipe"], r["fraction"], r["seed"]): r["auc"] for r in rows
                if r["task"] == task and r["recipe"].startswith("scratch")}
        head = "| recipe | steps | final loss | peak lr | " + " | ".join(
            f"AUC @ {f:g} | gain @ {f:g}" for f in fracs) + " |"
        out += [f"### {task}", "", head, "|" + "---|" * (4 + 2 * len(fracs))]
        for name in recipes:
            rr = [r for r in rows if r["task"] == task and r["recipe"] == name]
            if not rr:
                continue
            first = rr[0]
            loss = f"{first['final_loss']:.4f}" if first.get("final_loss") is not None else "–"
            lr = f"{first['lr_peak']:.3g}" if first.get("lr_peak") else "–"
            cells = []
            ref = scratch_for(name) + (f"+{name.split('+')[1]}" if "+" in name else "")
            for f in fracs:
                txt, _ = cell([r["auc"] for r in rr if r["fraction"] == f])
                # gain: mean over the seeds both runs have of (recipe AUC - scratch AUC), paired by seed
                diffs = [r["auc"] - base[(ref, f, r["seed"])] for r in rr
                         if r["fraction"] == f and (ref, f, r["seed"]) in base]
                gain = "" if name.startswith("scratch") or not diffs else (
                    f"{statistics.fmean(diffs):+.3f}" + (f" ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else ""))
                cells += [txt, gain]
            out.append(f"| {name} | {first['pretrain_steps']} | {loss} | {lr} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--covid", type=Path, default=Path("/work/shared/data/cxr_covid19_radiography"),
                   help="labelled collection; its non-test images form the pretraining pool")
    p.add_argument("--kermany", type=Path, default=Path("/work/shared/data/cxr_kermany_pneumonia"),
                   help="transfer task (probe only)")
    p.add_argument("--work", type=Path, default=Path("/tmp/recipe"), help="pool, runs and cache")
    p.add_argument("--budget", type=float, default=300, help="pretraining seconds per recipe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--code", type=Path, help="run the package from this source folder instead of the "
                   "installed one (a frozen snapshot while the checkout is being edited)")
    p.add_argument("--recipes", default="scratch,defaults,blr1.5e-3,blr1.5e-3-112px,scratch-112px,"
                   "simmim-blr1.5e-3,blr1.5e-3-112px-ratio0.6,blr5e-3-warmup0.25-112px",
                   help=f"comma list of {', '.join(RECIPES)} (default: the 2026-12-02 screen)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pools", default="token", help="probe features, comma list of token,avg")
    p.add_argument("--fractions", default="0.01,0.1", help="covid19 label fractions")
    p.add_argument("--kermany-fractions", default="0.01,0.1")
    p.add_argument("--jsonl", type=Path, default=here / "results" / "recipe-screen-2026-12-02.jsonl")
    p.add_argument("--report-only", action="store_true", help="print the tables from --jsonl and exit")
    args = p.parse_args()
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s): {unknown}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.pools = [x.strip() for x in args.pools.split(",") if x.strip()]
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.kermany_fractions = [float(f) for f in args.kermany_fractions.split(",")]
    if not args.report_only:
        screen(args)
    print(report(read_jsonl(args.jsonl)))
    print(f"\n{platform.processor() or platform.machine()}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
