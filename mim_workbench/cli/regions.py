"""CLI subcommand ``regions``: region masks for a whole folder.

``regions propose --data DIR --preset lungs --out MASKS_DIR`` proposes a mask for every image
(one JSON line per image on stdout, progress with ETA on stderr, a contact sheet PNG); the
masks pair with their images by name, so ``pretrain --masks MASKS_DIR`` then just works.
COMMANDS holds its ``_add_regions(sub) -> runner`` as described in :mod:`mim_workbench.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .args import AddCommand, Runner, add_data, add_out, add_quiet

PRESETS = ("lungs", "breast", "teeth", "tissue")


def _add_regions(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("regions", help="region masks for a folder of images: propose")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prop = actions.add_parser("propose", help="propose a preset's region for every image of a folder",
                              description="Propose a region mask for every image of --data into --out "
                                          "(masks named after their images; a killed run continues).")
    add_data(prop, "image folder, class folders or CSV manifest", required=True)
    source = prop.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, help="which region (default lungs)")
    source.add_argument("--model", help="a region model from 'regions learn' instead of a preset")
    add_out(prop, "folder for the masks (OUT/<image name>.png) and regions.json")
    prop.add_argument("--overwrite", action="store_true",
                      help="replace a folder's masks written with other settings")
    prop.add_argument("--sheet", type=Path,
                      help="contact sheet PNG (default OUT/contact_sheet.png; 'none' for no sheet)")
    prop.add_argument("--workers", type=int, default=None,
                      help="processes proposing in parallel (default: the machine's cores, at most 8)")
    add_quiet(prop, "no progress on stderr")
    _add_learn(actions)
    return _run_regions


def _add_learn(actions: argparse._SubParsersAction) -> None:
    learn = actions.add_parser("learn", help="learn a region from a few images with masks (any organ, any modality)",
                               description="Train a small region model on images and their masks (paired by name "
                                           "as everywhere); use it with 'regions propose --model' or "
                                           "'pretrain --region-model'.")
    add_data(learn, "images with masks: a folder (masks in --masks or a masks/ folder beside) or CSV manifest",
             masks="folder of the example masks, matched to images by name", required=True)
    add_out(learn, "model file to write (.safetensors)")
    learn.add_argument("--name", default="region", help="what the region is, e.g. lungs (used by the quality check)")
    learn.add_argument("--parts", type=int, default=0, help="keep this many largest parts (2 for lungs; 0: all)")
    learn.add_argument("--seconds", type=float, default=110.0, help="training time budget (default 110)")
    learn.add_argument("--steps", type=int, default=600, help="at most this many steps (default 600)")
    learn.add_argument("--init", help="continue from this region model (e.g. to adapt it to another hospital)")
    learn.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: the small network is fastest on one core)")
    learn.add_argument("--seed", type=int, default=0)
    add_quiet(learn, "no progress on stderr")


def _progress_printer(quiet: bool, what: str = "images"):
    """Progress lines on stderr, at most one a second (and the last one)."""
    last = [0.0]

    def show(p, extra: str = "") -> None:
        """Print ``p``'s done/total, ``extra`` and the ETA on stderr, at most once a second (always the last)."""
        done, total = (p.step, p.total) if hasattr(p, "step") else (p.done, p.total)
        now = time.monotonic()
        if quiet or (now - last[0] < 1.0 and done < total):
            return
        last[0] = now
        eta = "–" if p.eta_s is None else f"{int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}"
        unit = "steps" if what == "learning" else what
        print(f"regions: {done}/{total} {unit}" + (f" | {extra}" if extra else "") + f" | ETA {eta}",
              file=sys.stderr, flush=True)

    return show


def _run_regions(args: argparse.Namespace) -> int:
    return _run_learn(args) if args.action == "learn" else _run_propose(args)


def _run_learn(args: argparse.Namespace) -> int:
    import torch

    from ..regions.examples import examples_from_data
    from ..regions.learned import RegionModel, RegionModelConfig, learn_regions

    torch.set_num_threads(max(1, args.threads))
    images, masks, names = examples_from_data(args.data, args.masks)
    init = RegionModel.load(args.init) if args.init else None
    config = None if init else RegionModelConfig(name=args.name, parts=args.parts)
    printer = _progress_printer(args.quiet, "learning")
    model = learn_regions(images, masks, config=config, init=init, steps=args.steps, seconds=args.seconds,
                          seed=args.seed, on_progress=lambda p: printer(p, f"loss {p.loss:.3f}"))
    model.info["examples_from"] = names
    path = model.save(args.out)
    print(json.dumps({"model": str(path), "examples": len(images), "steps": model.info["steps"],
                      "seconds": model.info["seconds"], "name": model.config.name}))
    return 0


def _run_propose(args: argparse.Namespace) -> int:
    from ..regions.folder import contact_sheet, model_source, propose_folder

    records, status = [], 0
    workers = args.workers or min(8, os.cpu_count() or 1)
    source = model_source(args.model) if args.model else (args.preset or "lungs")
    if args.model and not Path(args.model).is_file():
        from ..errors import MimError

        raise MimError(f"{args.model}: no such region model file")
    for record in propose_folder(args.data, args.out, preset=source, overwrite=args.overwrite, workers=workers,
                                 on_progress=_progress_printer(args.quiet),
                                 on_note=lambda note: print(f"mim-workbench regions: {note}", file=sys.stderr)):
        records.append(record)
        if "error" in record:
            print(f"mim-workbench regions: skipped {record['error']}", file=sys.stderr, flush=True)
            status = 2
            continue
        print(json.dumps({k: record[k] for k in ("image", "mask", "area_fraction", "flag")}), flush=True)
    flagged = sum(1 for r in records if r.get("flag"))
    no_sheet = args.sheet is not None and str(args.sheet).lower() == "none"
    sheet = None if no_sheet else (args.sheet or Path(args.out) / "contact_sheet.png")
    if sheet is not None and any("mask" in r for r in records):
        contact_sheet(records, sheet)
    if not args.quiet:
        print(f"regions: {len(records)} images, {flagged} flagged, "
              f"{sum('error' in r for r in records)} unreadable" + (f"; contact sheet {sheet}" if sheet else ""),
              file=sys.stderr, flush=True)
    return status


COMMANDS: list[AddCommand] = [_add_regions]
