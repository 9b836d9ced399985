"""CLI subcommand ``evaluate``: the pretraining study (:mod:`mim_workbench.study`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .args import (PRETRAINING_DECODER_HELP, AddCommand, Runner, add_arch, add_device, add_out, add_quiet,
                   add_threads, arch_values)
from .control import StopOnSignal


def _add_evaluate(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser(
        "evaluate", help="does pretraining make few labels go further? variants x label fractions x seeds, "
                         "with paired bootstrap intervals",
        description="Pretrain each variant on the pool with the same budget, then probe or fine-tune it with each "
                    "label fraction and seed on the labelled set; scores the labelled test split and an optional "
                    "external set. Writes results.csv, table.md, plot.png and summary.json; re-running with the "
                    "same --out resumes.")
    p.add_argument("--data", required=True, metavar="PATH", help="labelled set (split by patient into train/val/test)")
    p.add_argument("--unlabeled", metavar="PATH", help="pretraining pool (labels ignored; default: --data's images); "
                   "labelled test images in it are never pretrained on")
    p.add_argument("--test-data", metavar="PATH", help="external labelled set (another hospital): scored only")
    add_out(p)
    p.add_argument("--variants",
                   help="comma list of scratch, mae, rgmim, simmim, miram, beit, feature, init=FILE "
                        "(default scratch,mae,rgmim,beit: no pretraining, random and region-guided masking, "
                        "and the cpu preset's visual tokens)")
    regions = p.add_mutually_exclusive_group()
    regions.add_argument("--masks", metavar="DIR", help="region masks of the pool's images (rgmim)")
    regions.add_argument("--region-preset", help="propose the pool's missing region masks with a preset (e.g. lungs)")
    regions.add_argument("--region-model", metavar="FILE", help="... or with a learned region model")
    p.add_argument("--fractions", default="0.01,0.1,1.0", help="label fractions, comma separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per fraction (default 3)")
    p.add_argument("--mode", choices=("probe", "full"), default="probe")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, default=20.0, help="pretraining minutes per variant")
    budget.add_argument("--budget-steps", type=int, help="pretraining optimiser steps per variant instead")
    p.add_argument("--preset", default="cpu", help="pretraining preset every variant starts from (default cpu)")
    p.add_argument("--pretrain-config", help="JSON/TOML file of extra pretraining settings")
    p.add_argument("--encoders", metavar="DIR", help="keep and reuse pretrained encoders here (default OUT/encoders); "
                   "point a second study at the first one's to reuse its encoders")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the mode's)")
    p.add_argument("--batch-size", type=int, help="batch size of pretraining and fine-tuning")
    p.add_argument("--pool", choices=("token", "avg"), help="image feature: mean of the patch tokens (default) or class token")
    p.add_argument("--head-init", choices=("random", "probe"),
                   help="--mode full: a random head (default) or one fitted on the frozen features first (LP-FT)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--pretrain-seed", type=int, default=0,
                   help="seed of every variant's pretraining (another seed pretrains the encoders again)")
    p.add_argument("--positive-class", help="positive class of binary AUC/AP (default the second class name)")
    add_device(p)
    add_threads(p)
    add_arch(p.add_argument_group("architecture", "the encoder of every variant"), decoder=PRETRAINING_DECODER_HELP)
    add_quiet(p)
    return _run_evaluate


def _study_config(args: argparse.Namespace) -> Any:
    from ..study import StudyConfig
    from ..study.config import DEFAULT_VARIANTS, parse_fractions
    from ..training.config import read_config_file

    pre: dict[str, Any] = {"preset": args.preset}
    if args.pretrain_config:
        pre.update(read_config_file(args.pretrain_config))
    pre.update(arch_values(args))
    ft: dict[str, Any] = {}
    if args.batch_size is not None:
        pre["batch_size"] = ft["batch_size"] = args.batch_size
    for key in ("epochs", "positive_class", "pool", "head_init"):
        if getattr(args, key) is not None:
            ft[key] = getattr(args, key)
    return StudyConfig(
        data=args.data, unlabeled=args.unlabeled, test_data=args.test_data, masks=args.masks,
        region_preset=args.region_preset, region_model=args.region_model, out=args.out,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else DEFAULT_VARIANTS,
        fractions=parse_fractions(args.fractions, "--fractions"), seeds=args.seeds, mode=args.mode,
        budget_minutes=args.budget_minutes, budget_steps=args.budget_steps, pretrain=pre, finetune=ft,
        encoders=args.encoders, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, pretrain_seed=args.pretrain_seed, device=args.device, threads=args.threads)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..study import StudyProgress, run_study

    def say(event: Any) -> None:
        """Print a StudyProgress message to stderr (unless --quiet); other events are not shown."""
        if isinstance(event, StudyProgress) and event.message and not args.quiet:
            print(event.message, file=sys.stderr, flush=True)

    with StopOnSignal() as control:
        res = run_study(_study_config(args), on_event=say, control=control)
    print(Path(res.files["table_md"]).read_text(encoding="utf-8"))
    return 0


COMMANDS: list[AddCommand] = [_add_evaluate]
