"""CLI subcommands of the MIM engine: pretrain, reconstruct, export, cache.

Each entry of ENGINE_COMMANDS is an ``_add_<name>(sub) -> runner`` like those in cli.py.
"""

from __future__ import annotations

ENGINE_COMMANDS: list = []
