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
    prop.add_argument("--preset", choices=PRESETS, default="lungs", help="which region (default lungs)")
    add_out(prop, "folder for the masks (OUT/<image name>.png) and regions.json")
    prop.add_argument("--overwrite", action="store_true",
                      help="replace a folder's masks written with other settings")
    prop.add_argument("--sheet", type=Path,
                      help="contact sheet PNG (default OUT/contact_sheet.png; 'none' for no sheet)")
    prop.add_argument("--workers", type=int, default=None,
                      help="processes proposing in parallel (default: the machine's cores, at most 8)")
    add_quiet(prop, "no progress on stderr")
    return _run_regions


def _progress_printer(quiet: bool):
    last = [0.0]

    def show(p) -> None:
        now = time.monotonic()
        if quiet or (now - last[0] < 1.0 and p.done < p.total):
            return
        last[0] = now
        eta = "–" if p.eta_s is None else f"{int(p.eta_s) // 60}:{int(p.eta_s) % 60:02d}"
        print(f"regions: {p.done}/{p.total} images | ETA {eta}", file=sys.stderr, flush=True)

    return show


def _run_regions(args: argparse.Namespace) -> int:
    from ..regions.folder import contact_sheet, propose_folder

    records, status = [], 0
    workers = args.workers or min(8, os.cpu_count() or 1)
    for record in propose_folder(args.data, args.out, preset=args.preset, overwrite=args.overwrite, workers=workers,
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
