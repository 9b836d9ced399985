"""CLI subcommand ``cache``: the decoded-image cache that ``pretrain --cache`` fills.

COMMANDS holds its ``_add_cache(sub) -> runner`` as described in :mod:`mim_workbench.cli`.
"""

from __future__ import annotations

import argparse
import json

from .args import AddCommand, Runner


def _add_cache(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("cache", help="the decoded-image cache: info | clear")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--dir", help="cache folder (default $MIM_WORKBENCH_CACHE or ~/.cache/mim-workbench/decoded)")
    return _run_cache


def _run_cache(args: argparse.Namespace) -> int:
    from ..io.cache import DecodeCache

    cache = DecodeCache(args.dir) if args.dir else DecodeCache()
    if args.action == "info":
        print(json.dumps({"root": str(cache.root), "entries": len(cache), "bytes": cache.size_bytes(),
                          "max_bytes": cache.max_bytes}))
    else:
        freed = cache.clear()
        print(json.dumps({"root": str(cache.root), "freed_bytes": freed}))
    return 0


COMMANDS: list[AddCommand] = [_add_cache]
