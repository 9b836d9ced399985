"""CLI subcommand ``pretrain``: masked-image-model pretraining.

Each entry of COMMANDS is an ``_add_<name>(sub) -> runner`` as described in
:mod:`mim_workbench.cli`.  Ratios and fractions are 0-1.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from .args import (AddCommand, Flags, Runner, add_amp, add_arch, add_data, add_device, add_out, add_quiet,
                   add_threads, add_time_budget)
from .control import StopOnSignal

if TYPE_CHECKING:  # torch comes with it: imported when a command runs, not for --help
    from ..training.config import PretrainConfig

# CLI flag dest -> PretrainConfig field, for flags whose name differs from the field.
_MODEL_OPTIONS = ("codebook_size", "feature_layers")   # flags that set ModelConfig fields (model_options)
_PRETRAIN_FIELD = {"time_budget": "time_budget_s", "decoder_dim": "decoder_embed_dim",
                   "decoder_heads": "decoder_num_heads"}


# ===================================================================== pretrain
def _add_pretrain(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser(
        "pretrain", help="masked-image-model pretraining (MAE, SimMIM, RGMIM = mae + region, MIRAM)",
        description="Pretrain a ViT encoder by masked image modeling. Settings come from --config (JSON or "
                    "TOML), then the flags given here. The first Ctrl-C stops after the current step and saves "
                    "a checkpoint; resume with --resume RUN_DIR.",
    )
    # Every flag defaults to None: pretrain_config_from_args then leaves the value to --config or PretrainConfig.
    _add_data_flags(p.add_argument_group("data"))
    _add_crop_flags(p.add_argument_group(
        "large images", "train on region-guided crops read from each image's on-disk pyramid "
                        "instead of whole letterboxed images (mammograms, slides)"))
    _add_method_flags(p.add_argument_group("method"))
    _add_optimisation_flags(p.add_argument_group("optimisation"))
    _add_run_flags(p.add_argument_group("run"))
    add_quiet(p, "no progress output")
    return _run_pretrain


def _add_data_flags(g: Flags) -> None:
    add_data(g, "image folder, class folders or CSV manifest",
             masks="folder of region (organ) masks matched to images by name")
    g.add_argument("--region-preset", choices=("lungs", "breast", "teeth", "tissue"),
                   help="with --strategy region: propose the masks that are missing with this preset "
                        "(once; cached for later runs)")
    g.add_argument("--region-model", help="with --strategy region: propose the missing masks with this "
                                          "learned region model (from 'regions learn')")
    g.add_argument("--val-fraction", type=float, help="fraction of patients held back for validation (default 0.1)")
    g.add_argument("--val-every", type=int, help="epochs between validations (default 1; 0 = never)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="disable augmentation")
    g.add_argument("--cache", action="store_const", const=True,
                   help="cache decoded, resized images on disk (default: when the data fit the cache's 2 GB cap)")
    g.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                   help="decode every image every epoch")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")


def _add_crop_flags(g: Flags) -> None:
    g.add_argument("--crop-level", type=int, metavar="N", help="pyramid level of the crops (0 = full resolution)")
    g.add_argument("--crop-spacing", type=float, metavar="MM",
                   help="or: the coarsest level whose pixels are at most this size in mm")
    g.add_argument("--crops-per-image", type=int, help="crops of each image per epoch (default 16)")
    g.add_argument("--crop-region-fraction", type=float,
                   help="share of crops centred on the region mask, 0-1 (default 0.9)")


def _add_method_flags(g: Flags) -> None:
    g.add_argument("--preset", help="named settings: quick-cpu (64 px SimMIM, learns in a minute on a CPU), "
                   "rgmim-paper (ViT-B/16, RGMIM Table 1) or cpu (the defaults)")
    # the names are checked by PretrainConfig (importing its tuples here would load torch for --help)
    g.add_argument("--method",
                   help="pixels: mae, simmim, miram (multi-scale); visual tokens: beit; teacher features: feature")
    g.add_argument("--strategy", help="masking: random, block (SimMIM), blockwise (BEiT) or region (default: "
                   "random for mae/miram, block for simmim, blockwise for beit/feature)")
    g.add_argument("--ratio", type=float,
                   help="fraction of patches masked (default 0.75; simmim and feature 0.6, beit 0.4)")
    g.add_argument("--codebook-size", type=int, help="beit: visual tokens of the tokenizer (default 512)")
    g.add_argument("--feature-layers", type=int,
                   help="feature: teacher blocks averaged into the targets (default: the top half)")
    add_arch(g, img_size="training size: N or HxW (default 224)",
             decoder=("decoder width (default 128)", "decoder blocks (default 4)",
                      "decoder attention heads (default 4)"))
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="per-patch normalised targets (MAE)")
    g.add_argument("--init", help="start from these encoder weights (export, checkpoint or timm state dict)")


def _add_optimisation_flags(g: Flags) -> None:
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch per step, split over processes (default 16)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--lr", type=float, help="absolute learning rate (default: blr scaled to the batch)")
    g.add_argument("--blr", type=float, help="base learning rate for a batch of 256 (default 4e-4; beit 2e-3)")
    g.add_argument("--lr-scaling", choices=("linear", "sqrt"),
                   help="how blr scales to batch x accum: sqrt (default; Adam, small batches) or linear (MAE)")
    g.add_argument("--min-lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--clip-grad", type=float, help="gradient-norm clipping (default off; 5 for simmim)")
    add_amp(g, ("auto", "bf16", "fp16", "off"),
            "mixed precision: CUDA bf16/fp16 (default auto); on the CPU bf16 where it has AMX/AVX512-BF16 "
            "(auto = bf16 with AMX for encoders at least 192 wide, else fp32)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training forward (the first step compiles, ~1 min on a small CPU; "
                        "falls back to eager if compiling fails)")


def _add_run_flags(g: Flags) -> None:
    add_out(g, "run directory (config.json, metrics.csv, ckpt-<step>/)", required=False)
    g.add_argument("--resume", help="continue a run: its directory or a checkpoint")
    g.add_argument("--config", help="settings file (JSON or TOML); flags override it")
    add_device(g, None, "auto | cpu | cuda | cuda:N | mps (default auto)")
    add_threads(g, "CPU threads for torch")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many steps (schedule unchanged)")
    add_time_budget(g)
    g.add_argument("--checkpoint-every", help='steps between checkpoints, or "epoch" (default)')
    g.add_argument("--keep-checkpoints", type=int, help="keep the N newest checkpoints (0 = all; default 3)")
    g.add_argument("--preview-every", type=int, help="steps between preview pictures (0 = never)")


def pretrain_config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The PretrainConfig of ``--config`` (if any) overlaid with the flags given (those not None)."""
    from ..models.config import ENCODER_FIELDS, nest_encoder_fields
    from ..training.config import PretrainConfig, read_config_file

    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    values = nest_encoder_fields({str(k).replace("-", "_"): v for k, v in values.items()})
    skip = {"command", "config", "quiet"}
    for dest, value in vars(args).items():
        if dest in skip or value is None:
            continue
        field = _PRETRAIN_FIELD.get(dest, dest)
        if field == "checkpoint_every" and str(value).isdigit():
            value = int(value)
        if field in _MODEL_OPTIONS:
            values["model_options"] = {**values.get("model_options", {}), field: value}
            continue
        # a flag overrides the file's value, wherever the file put it
        (values.setdefault("encoder", {}) if field in ENCODER_FIELDS else values)[field] = value
    return PretrainConfig.from_dict(values)


def _run_pretrain(args: argparse.Namespace) -> int:
    from ..training.pretrain_loop import pretrain
    from ..training.progress import ProgressPrinter

    config = pretrain_config_from_args(args)
    printer = None if args.quiet else ProgressPrinter()
    with StopOnSignal() as control:
        result = pretrain(config, on_event=printer, control=control)
    # Under torchrun only rank 0 writes checkpoints; the other ranks succeed without one.
    rank = int(os.environ.get("RANK", "0"))
    return 0 if result.last_checkpoint or rank != 0 else 1


COMMANDS: list[AddCommand] = [_add_pretrain]
