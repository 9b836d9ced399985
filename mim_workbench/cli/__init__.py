"""mim-workbench command line: the same core functions the GUI calls.

Every subcommand is a pair ``_add_<name>(sub) -> runner`` / ``_run_<name>(args) -> int``
in the module of its family; each family module lists its ``_add_`` functions in
``COMMANDS``, and the flags that several commands share come from :mod:`.args`.
Errors derived from :class:`MimError` become one line on stderr and exit code 2.

Building the parser imports no heavy module (torch, the training and inference
core, napari): the runners import those when they run, so that ``--help`` starts at
once and each command loads only what it uses.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import MimError
from . import app, bench, cache, explain, finetune, pretrain, reconstruct, regions, study
from .args import AddCommand, Runner

__all__ = ["COMMANDS", "build_parser", "main"]

#: Every subcommand's adder, in the order ``mim-workbench --help`` lists them.
COMMANDS: list[AddCommand] = [
    *app.COMMANDS, *pretrain.COMMANDS, *reconstruct.COMMANDS, *explain.COMMANDS, *cache.COMMANDS, *finetune.COMMANDS,
    *study.COMMANDS,
    *regions.COMMANDS, *bench.COMMANDS,
]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    """The ``mim-workbench`` parser with every subcommand, and each subcommand's runner by name."""
    parser = argparse.ArgumentParser(prog="mim-workbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mim-workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Runner] = {}
    for add in COMMANDS:
        before = set(sub.choices)
        runner = add(sub)
        for name in set(sub.choices) - before:
            runners[name] = runner
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    """Run ``mim-workbench`` with *argv* (default ``sys.argv[1:]``) and return the command's exit code:
    0 on success, 2 for a :class:`MimError` (shown as one line on stderr), 130 on Ctrl-C.  Usage errors,
    ``--help`` and ``--version`` exit through argparse's ``SystemExit`` (codes 2, 0, 0)."""
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except MimError as exc:
        print(f"mim-workbench {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mim-workbench {args.command}: interrupted", file=sys.stderr)
        return 130
