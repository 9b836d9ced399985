"""CLI subcommands for downstream tasks: finetune, predict, dense-train, dense-predict.

Each entry of COMMANDS is an ``_add_<name>(sub) -> runner`` as described in
:mod:`mim_workbench.cli`.  ``--checkpoint`` accepts what ``load_checkpoint`` accepts
(run directory, ``ckpt-<step>`` directory or a file in it); for ``finetune`` and
``dense-train`` also an exported encoder (``.safetensors``) or ``scratch`` (a random
encoder).  Fractions are 0-1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConfigError
from .args import (ANY_DEVICE_HELP, ARCH_HELP, CPU_DEVICE_HELP, AddCommand, Runner,
                   add_arch, add_checkpoint, add_data, add_device, add_image_or_data, add_out, add_quiet,
                   add_threads, add_time_budget, arch_values)
from .control import StopOnSignal

if TYPE_CHECKING:  # the CLI imports torch and the training code only when a command runs
    import torch

    from ..models import ModelConfig
    from ..training.progress import ProgressPrinter


def _printer(task: str, quiet: bool) -> ProgressPrinter | None:
    """ProgressPrinter with a Started line for this task (None when quiet)."""
    if quiet:
        return None
    from ..training import events as ev
    from ..training.progress import ProgressPrinter

    class _Printer(ProgressPrinter):
        def __call__(self, event: ev.Event) -> None:
            """Print a task-specific line for Started; every other event as ProgressPrinter does."""
            if isinstance(event, ev.Started):
                c = event.config
                what = c.get("mode") if task == "finetune" else f"{len(c.get('classes', []))} classes"
                self._line(f"{task}: {what}, {event.n_train} train / {event.n_val} val images, "
                           f"{event.total_steps} steps, lr {event.lr:.3g}, {event.device} -> {event.run_dir or '-'}")
                for note in event.notes:
                    self._line(f"  note: {note}")
                self._every = max(1, event.stop_at // 20)
                return
            super().__call__(event)

    return _Printer()


# ===================================================================== finetune
def _add_finetune(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser(
        "finetune", help="linear probe or fine-tune a classifier on a (pretrained) encoder; metrics.json + checkpoint",
        description="Train a classifier on labelled images: a linear probe of the frozen encoder (--mode probe) or "
                    "full fine-tuning with layer-wise lr decay (--mode full). Splits are by patient; --fraction keeps "
                    "a stratified share of the training labels. Writes metrics.json (accuracy, AUC, AP on the test "
                    "split), history.csv and a checkpoint that `predict` uses.",
    )
    add_checkpoint(p, "pretrain/finetune checkpoint or run directory, an exported encoder .safetensors, or "
                      "'scratch' (required unless --resume)", required=False)
    add_data(p, "labelled images: class folders, images/ + labels.csv, or a CSV manifest (required unless --resume)",
             masks="region-mask folder (only used to discover the data set)")
    add_out(p, "run directory (required unless --resume)", required=False)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped or crashed run from its last finished epoch, with its own settings "
                        "(only --device, --threads, --max-steps, --time-budget may be given)")
    p.add_argument("--mode", choices=("probe", "full"), default="probe", help="default probe")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the training labels used (default 1.0)")
    p.add_argument("--epochs", type=int, help="default 100 (probe) / 30 (full)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 probe / 3e-4 full)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay, full mode (default 0.75)")
    p.add_argument("--label-smoothing", type=float, help="default 0 probe / 0.1 full")
    p.add_argument("--drop-path", type=float, help="full mode (default 0.1)")
    p.add_argument("--test-data", metavar="PATH",
                   help="an external labelled set (another hospital): scored as 'external', never trained on")
    p.add_argument("--pool", choices=("token", "avg"),
                   help="image feature: mean of the patch tokens (default) or class token")
    p.add_argument("--head-init", choices=("random", "probe"),
                   help="full mode: start from a random head (default) or one fitted on the frozen features (LP-FT)")
    p.add_argument("--balance", choices=("weights", "sampler", "none"), help="class imbalance (default weights)")
    p.add_argument("--patience", type=int, help="early stopping: epochs without a better val loss (0 = off)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="augmentation (default: off for probe, on for full)")
    p.add_argument("--val-fraction", type=float, help="share of patients for validation (default 0.15)")
    p.add_argument("--test-fraction", type=float, help="share of patients for testing (default 0.2)")
    p.add_argument("--split-seed", type=int, help="seed of the patient split (default 0)")
    p.add_argument("--positive-class", help="positive class of binary AUC/AP (default the second class)")
    p.add_argument("--seed", type=int, default=0, help="label subset, head init, sample order")
    add_device(p, "auto", ANY_DEVICE_HELP)
    add_threads(p)
    p.add_argument("--max-steps", type=int)
    add_time_budget(p)
    add_arch(p.add_argument_group("scratch encoder", ARCH_HELP))
    add_quiet(p)
    # The training settings' defaults, read off the parser: --resume refuses any that were changed.
    defaults = vars(p.parse_known_args([])[0])
    p.set_defaults(setting_defaults={k: v for k, v in defaults.items() if k not in _RESUME_FLAGS})
    return _run_finetune


#: finetune flags --resume accepts: where and how long the continued run goes, not what it computes.
_RESUME_FLAGS = frozenset({"resume", "device", "threads", "max_steps", "time_budget", "quiet"})


def _resume_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the run in ``--resume RUN_DIR`` plus the run-control flags given with it."""
    from ..training.finetune_state import resume_config

    given = [k for k, default in args.setting_defaults.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"--resume continues the run with its own settings; drop {flags} "
                          "(only --device, --threads, --max-steps, --time-budget may be given)")
    return resume_config(args.resume, device=None if args.device == "auto" else args.device, threads=args.threads,
                         max_steps=args.max_steps, time_budget_s=args.time_budget)


def _run_finetune(args: argparse.Namespace) -> int:
    if args.resume:
        return _run_values(_resume_values(args), args)
    missing = [f"--{k}" for k in ("checkpoint", "data", "out") if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"finetune needs {', '.join(missing)} (or --resume RUN_DIR to continue a run)")
    values: dict[str, Any] = {"checkpoint": args.checkpoint, "data": args.data, "out": args.out, "mode": args.mode,
                              "fraction": args.fraction, "batch_size": args.batch_size, "seed": args.seed,
                              "device": args.device, **arch_values(args)}
    for k in ("masks", "epochs", "lr", "weight_decay", "layer_decay", "label_smoothing", "drop_path", "balance",
              "patience", "augment", "val_fraction", "test_fraction", "split_seed", "positive_class", "threads",
              "max_steps", "pool", "head_init", "test_data"):
        if getattr(args, k) is not None:
            values[k] = getattr(args, k)
    if args.time_budget is not None:
        values["time_budget_s"] = args.time_budget
    return _run_values(values, args)


def _run_values(values: dict[str, Any], args: argparse.Namespace) -> int:
    from ..inference.reconstruct import json_safe
    from ..training.finetune import FinetuneConfig, finetune

    with StopOnSignal() as control:
        res = finetune(FinetuneConfig.from_dict(values), on_event=_printer("finetune", args.quiet), control=control)
    m = res.metrics
    print(json.dumps(json_safe({"accuracy": m.get("accuracy"), "auc": m.get("auc"), "ap": m.get("ap"),
                                "split": res.eval_split, "n": m.get("n"), "checkpoint": res.checkpoint,
                                "metrics": str(Path(res.run_dir) / "metrics.json")})))
    for note in m.get("notes") or []:
        print(f"mim-workbench finetune: note: {note}", file=sys.stderr)
    return 0


# ===================================================================== predict
def _add_predict(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("predict", help="class probabilities and maps (finetune checkpoint) or dense probability maps")
    add_checkpoint(p, "finetune or dense checkpoint (or its run directory)")
    add_image_or_data(p, "one image -> predictions.json", "a folder or dataset -> predictions.csv")
    add_out(p)
    p.add_argument("--map", choices=("auto", "patch_logits", "rollout"), default="auto",
                   help="spatial map of a classifier (default: patch logits for full, rollout for probe models)")
    p.add_argument("--no-maps", action="store_true", help="folder mode: only the CSV")
    add_device(p, "cpu", CPU_DEVICE_HELP)
    _add_tiled(p)
    p.add_argument("--class", dest="map_class", help="--tiled classifier: the class whose map is written "
                                                      "(default the predicted one)")
    return _run_predict


def _add_tiled(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tiled (large images)",
                             "--image only: maps of the whole image at a pyramid level, tile by tile into "
                             "OUT/maps.zarr (OME-Zarr multiscale; memory bounded by one band of tiles)")
    g.add_argument("--tiled", action="store_true", help="predict tile by tile (mammograms, slides)")
    g.add_argument("--level", type=int, default=0, help="pyramid level (0 = full resolution; default 0)")
    g.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    g.add_argument("--batch-size", type=int, default=8, help="tiles per batch (default 8)")
    g.add_argument("--tile", type=int, help="tile side in pixels of the level (default: the model's)")


def _run_predict(args: argparse.Namespace) -> int:
    from ..inference.predict import predict_folder, predict_one
    from ..training.runtime import select_device

    device = select_device(args.device)
    if getattr(args, "tiled", False):
        return _run_predict_tiled(args, device)
    if args.image:
        path = predict_one(args.checkpoint, args.image, args.out, device=device, map=args.map)
        print(json.dumps(json.loads(path.read_text(encoding="utf-8"))))
    else:
        path = predict_folder(args.checkpoint, args.data, args.out, device=device, map=args.map,
                              save_maps=not args.no_maps)
        print(str(path))
    return 0


def _run_predict_tiled(args: argparse.Namespace, device: torch.device) -> int:
    from ..inference.predict import _safe
    from ..inference.tiled_predict import predict_tiled, save_tiled_prediction

    if not args.image:
        raise ConfigError("--tiled needs --image (one large image), not --data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = predict_tiled(args.checkpoint, args.image, out=out / "maps.zarr", level=args.level,
                        cls=getattr(args, "map_class", None), overlap=args.overlap, batch_size=args.batch_size,
                        tile=args.tile, device=device)
    path = save_tiled_prediction(res, out, _safe(Path(args.image).stem))[0]
    print(json.dumps(json.loads(path.read_text(encoding="utf-8"))))
    return 0


# ===================================================================== dense
_STROKE_SUFFIXES = ("", "_strokes", "_labels", "_label")
_STROKE_EXTS = (".png", ".tif", ".tiff", ".npy")


def match_strokes(images_dir: Path, strokes_dir: Path) -> tuple[list[Path], list[Path], list[str]]:
    """(images, stroke files, skipped image names), matched by stem (``<stem>[_strokes|_labels].png|tif|npy``).

    Raises ConfigError when either folder is missing or no image has strokes.
    """
    from ..io.datasets import file_stem
    from ..io.readers import list_image_files

    if not images_dir.is_dir():
        raise ConfigError(f"--images {images_dir}: not a folder")
    if not strokes_dir.is_dir():
        raise ConfigError(f"--strokes {strokes_dir}: not a folder")
    files = {f.name: f for f in strokes_dir.iterdir() if f.is_file()}
    imgs, strokes, skipped = [], [], []
    for img in list_image_files(images_dir):
        stem = file_stem(img)
        hit = next((files[stem + s + e] for s in _STROKE_SUFFIXES for e in _STROKE_EXTS if stem + s + e in files), None)
        if hit is None:
            skipped.append(img.name)
        else:
            imgs.append(img)
            strokes.append(hit)
    if not imgs:
        raise ConfigError(f"no stroke file in {strokes_dir} matches an image of {images_dir} "
                          "(expected <stem>.png / .tif / .npy label images)")
    return imgs, strokes, skipped


def _add_dense_train(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("dense-train", help="train a dense head (per-pixel classes) from painted strokes",
                       description="Strokes are label images (0 = unlabelled, 1..K = classes) named like the images "
                                   "(<stem>.png, .tif or .npy); images without strokes are skipped.")
    add_checkpoint(p, "encoder: pretrain checkpoint or run directory, exported .safetensors, or 'random'")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--strokes", required=True, help="stroke label images, by image stem")
    add_out(p, "run directory for the dense checkpoint")
    p.add_argument("--classes", help="names of labels 1..K, comma separated")
    p.add_argument("--mode", choices=("tile", "letterbox"),
                   help="how images of any size meet the encoder (default tile)")
    p.add_argument("--scale", type=float, help="tile mode: resize images by this first (default 1.0)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 300)")
    p.add_argument("--batch-size", type=int, help="crops per step (default 8)")
    p.add_argument("--crop", type=int, help="crop side in working pixels (default 64)")
    p.add_argument("--lr", type=float)
    p.add_argument("--no-refine", dest="refine", action="store_const", const=False,
                   help="per-patch classifier only (no conv refinement)")
    p.add_argument("--no-features", dest="use_features", action="store_const", const=False,
                   help="ignore the encoder: image-only conv head (baseline)")
    p.add_argument("--seed", type=int)
    add_device(p)
    add_threads(p)
    add_time_budget(p, None)
    add_arch(p.add_argument_group("random encoder", "architecture when --checkpoint random"))
    add_quiet(p)
    return _run_dense_train


def _random_model_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig of the architecture flags, for ``--checkpoint random``."""
    from ..models import ModelConfig

    return ModelConfig.from_dict(arch_values(args))


def _run_dense_train(args: argparse.Namespace) -> int:
    from ..models.dense import DenseConfig
    from ..training.dense import train_dense
    from ..training.encoder_source import is_random_source

    imgs, strokes, skipped = match_strokes(Path(args.images), Path(args.strokes))
    if skipped:
        print(f"mim-workbench dense-train: note: {len(skipped)} image(s) without strokes skipped", file=sys.stderr)
    values: dict[str, Any] = {"device": args.device}
    for k in ("mode", "scale", "steps", "batch_size", "crop", "lr", "refine", "use_features", "seed", "threads"):
        if getattr(args, k) is not None:
            values[k] = getattr(args, k)
    if args.time_budget is not None:
        values["time_budget_s"] = args.time_budget
    if args.classes:
        values["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    model_config = _random_model_config(args) if is_random_source(args.checkpoint) else None
    with StopOnSignal() as control:
        head = train_dense([str(p) for p in imgs], [str(p) for p in strokes], checkpoint=args.checkpoint,
                           model_config=model_config, config=DenseConfig(**values), out=args.out,
                           on_event=_printer("dense-train", args.quiet), control=control)
    print(json.dumps({"checkpoint": head.checkpoint, "classes": head.classes, "images": len(imgs),
                      "final_loss": head.history[-1]["loss"] if head.history else None}))
    return 0


def _add_dense_predict(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("dense-predict", help="per-class probability maps and labels from a dense checkpoint")
    add_checkpoint(p, "dense checkpoint (or its run directory)")
    add_image_or_data(p, "one image -> predictions.json + maps", "a folder -> predictions.csv + maps")
    add_out(p, None)
    add_device(p, "cpu")
    _add_tiled(p)
    return _run_dense_predict


def _run_dense_predict(args: argparse.Namespace) -> int:
    from ..models.checkpoint import load_checkpoint
    from ..models.dense import DENSE_KIND

    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.kind != DENSE_KIND:
        raise CheckpointError(f"{ckpt.path}: a {ckpt.kind!r} checkpoint; dense-predict needs a dense head "
                              "(use `predict` for classifiers)")
    return _run_predict(argparse.Namespace(checkpoint=ckpt, image=args.image, data=args.data, out=args.out,
                                           map="auto", no_maps=False, device=args.device, tiled=args.tiled,
                                           level=args.level, overlap=args.overlap, batch_size=args.batch_size,
                                           tile=args.tile, map_class=None))


COMMANDS: list[AddCommand] = [_add_finetune, _add_predict, _add_dense_train, _add_dense_predict]
