"""Argument groups that several subcommands share, each written once.

A command family's module calls these on its parser (or on one of its argument
groups) in the order its ``--help`` lists the flags; the help texts differ where
the commands differ, so the caller may word them, and the defaults say what most
commands mean.  Every ``--checkpoint`` accepts a ``ckpt-<step>`` directory, any
file inside it, or a run directory (its newest complete checkpoint).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

#: What a subcommand runs: parsed arguments in, exit code out.
Runner = Callable[[argparse.Namespace], int]
#: Registers one subcommand on the ``mim-workbench`` subparsers and returns its runner.
AddCommand = Callable[[argparse._SubParsersAction], Runner]
#: Where the flags go: a parser, an argument group or a mutually exclusive group.
Flags = argparse._ActionsContainer

CHECKPOINT_HELP = "checkpoint directory, a file in it, or a run directory"
CPU_DEVICE_HELP = "cpu | cuda | mps (default cpu)"
ANY_DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"
ARCH_HELP = "architecture of a scratch encoder (ignored with a checkpoint, except --img-size)"
#: --decoder-dim, --decoder-depth, --decoder-heads of commands that pretrain on the way (evaluate).
PRETRAINING_DECODER_HELP = ("pretraining decoder width (default 128)", "pretraining decoder blocks (default 4)",
                            "pretraining decoder heads (default 4)")
_ARCH_FLAGS = ("model", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
# decoder flag dest -> ModelConfig field, where the names differ
_DECODER_FIELDS = (("decoder_dim", "decoder_embed_dim"), ("decoder_depth", "decoder_depth"),
                   ("decoder_heads", "decoder_num_heads"))


def add_checkpoint(p: Flags, help: str = CHECKPOINT_HELP, *, required: bool = True) -> None:
    """Add ``--checkpoint``: the model a command starts from or applies."""
    p.add_argument("--checkpoint", required=required, help=help)


def add_image(p: Flags, help: str, *, required: bool = True) -> None:
    """Add ``--image``: one image file."""
    p.add_argument("--image", required=required, help=help)


def add_data(p: Flags, help: str, *, masks: str | None = None, required: bool = False) -> None:
    """Add ``--data`` (a folder, data set or manifest) and, when *masks* is its help, ``--masks`` after it."""
    p.add_argument("--data", required=required, help=help)
    if masks is not None:
        p.add_argument("--masks", help=masks)


def add_image_or_data(p: argparse.ArgumentParser, image: str, data: str) -> None:
    """Add ``--image`` and ``--data`` as alternatives: exactly one of them must be given."""
    src = p.add_mutually_exclusive_group(required=True)
    add_image(src, image, required=False)
    add_data(src, data)


def add_out(p: Flags, help: str | None = "output folder", *, required: bool = True, default: str | None = None) -> None:
    """Add ``--out``: where the command writes (a folder, run directory or file, as *help* says)."""
    p.add_argument("--out", required=required, default=default, help=help)


def add_device(p: Flags, default: str | None = "auto", help: str | None = None) -> None:
    """Add ``--device``; *default* None leaves the choice to the settings file or the core."""
    p.add_argument("--device", default=default, help=help)


def add_threads(p: Flags, help: str | None = None) -> None:
    """Add ``--threads``: torch's CPU threads (None: torch's choice)."""
    p.add_argument("--threads", type=int, help=help)


def add_amp(p: Flags, choices: tuple[str, ...], help: str) -> None:
    """Add ``--amp``: the mixed precision of the forward pass, one of *choices* (None when not given)."""
    p.add_argument("--amp", choices=choices, help=help)


def add_time_budget(p: Flags, help: str | None = "stop after S seconds of training") -> None:
    """Add ``--time-budget S``: seconds of training before a clean stop (dest ``time_budget``)."""
    p.add_argument("--time-budget", type=float, metavar="S", help=help)


def add_quiet(p: Flags, help: str | None = None) -> None:
    """Add ``--quiet``: no progress output."""
    p.add_argument("--quiet", action="store_true", help=help)


def add_arch(g: Flags, *, img_size: str = "input size N or HxW (default: the checkpoint's; 224 from scratch)",
             decoder: tuple[str, str, str] | None = None) -> None:
    """Add the ViT architecture flags (``--model`` ... ``--num-heads``) and, with *decoder* helps given,
    ``--decoder-dim``, ``--decoder-depth``, ``--decoder-heads``; none has a default (None: not given)."""
    g.add_argument("--model", help="timm ViT name (default vit_tiny_patch16_224)")
    g.add_argument("--img-size", help=img_size)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num-heads", type=int)
    if decoder is not None:
        for (flag, _), help in zip(_DECODER_FIELDS, decoder, strict=True):
            g.add_argument("--" + flag.replace("_", "-"), type=int, help=help)


def arch_values(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture flags that were given, keyed by ModelConfig field."""
    out = {k: getattr(args, k) for k in _ARCH_FLAGS if getattr(args, k, None) is not None}
    for flag, key in _DECODER_FIELDS:
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    return out
