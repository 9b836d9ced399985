"""CLI subcommands around the application itself: ``info``, ``gui`` and ``demo``.

COMMANDS holds their ``_add_<name>(sub) -> runner`` as described in :mod:`mim_workbench.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..display import has_display
from ..errors import MimError
from .args import AddCommand, Runner, add_device, add_out


# --------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("info", help="print one JSON line per image file: shape, spacing, window, range")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--keep-color", action="store_true", help="do not convert RGB to grey")
    return _run_info


def _run_info(args: argparse.Namespace) -> int:
    from ..io import info_records

    status = 0
    for path in args.paths:
        for rec in info_records(path, keep_color=args.keep_color):
            if "error" in rec:
                print(f"mim-workbench info: {rec['error']}", file=sys.stderr)
                status = 2
            else:
                print(json.dumps(rec), flush=True)
    return status


# --------------------------------------------------------------------- gui / demo
def _add_gui(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("gui", help="open napari with the workbench docked and a sample chest X-ray")
    p.add_argument("paths", nargs="*", help="images to open instead of the sample")
    p.add_argument("--demo-out", default="mim-demo", help="where the headless demo writes when no display exists")
    p.add_argument("--demo-seconds", type=float, default=60.0, help="the headless demo's pretraining time budget")
    p.add_argument("--self-check", action="store_true",
                   help="open the window as usual, wait until docks and layers are shown, print one JSON "
                        "line (napari, qt_api, gl_renderer, docks, layers, seconds_to_ready), close, exit 0")
    p.add_argument("--screenshot", type=Path, help="with --self-check: save a screenshot of the whole window")
    p.add_argument("--timeout", type=float, default=120.0, help="with --self-check: seconds to wait for the window")
    return _run_gui


def _run_gui(args: argparse.Namespace) -> int:
    if args.screenshot and not args.self_check:
        raise MimError("--screenshot goes with --self-check")
    if not has_display() and not args.self_check:
        print("mim-workbench gui: no display found (DISPLAY is unset); running the headless demo instead "
              f"(pictures go to {args.demo_out}/)", file=sys.stderr)
        return _run_demo(argparse.Namespace(out=args.demo_out, seconds=args.demo_seconds, device="auto"))
    # the one place where the core hands over to the napari front end, a separate package
    try:
        from mim_workbench_napari import launch
    except ImportError as exc:
        raise MimError(f"the GUI is not installed ({exc}); pip install 'mim-workbench[gui]'") from exc
    return launch(args.paths, self_check=args.self_check, screenshot=args.screenshot, timeout_s=args.timeout)


def _add_demo(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("demo", help="headless end-to-end run on the sample data; writes pictures")
    add_out(p, required=False, default="mim-demo")
    p.add_argument("--seconds", type=float, default=60.0, help="pretraining time budget")
    add_device(p, "auto", "auto|cpu|cuda|mps")
    return _run_demo


def _run_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out), seconds=args.seconds, device=args.device)
    return 0


COMMANDS: list[AddCommand] = [_add_info, _add_gui, _add_demo]
