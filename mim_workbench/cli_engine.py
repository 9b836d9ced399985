"""CLI subcommands of the MIM engine: pretrain, reconstruct, export, cache.

Each entry of ENGINE_COMMANDS is an ``_add_<name>(sub) -> runner`` like those in cli.py.
Every ``--checkpoint`` accepts a ``ckpt-<step>`` directory, any file inside it, or
a run directory (its newest complete checkpoint).  Ratios and fractions are 0–1.
"""

from __future__ import annotations

import argparse
import os
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runner = Callable[[argparse.Namespace], int]

# CLI flag dest -> PretrainConfig field, for flags whose name differs from the field.
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
    g = p.add_argument_group("data")
    g.add_argument("--data", help="image folder, class folders or CSV manifest")
    g.add_argument("--masks", help="folder of region (organ) masks matched to images by name")
    g.add_argument("--val-fraction", type=float, help="fraction of patients held back for validation (default 0.1)")
    g.add_argument("--val-every", type=int, help="epochs between validations (default 1; 0 = never)")
    g.add_argument("--no-augment", dest="augment", action="store_const", const=False, help="disable augmentation")
    g.add_argument("--cache", action="store_const", const=True,
                   help="cache decoded, resized images on disk (default: when the data fit the cache's 2 GB cap)")
    g.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                   help="decode every image every epoch")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    g = p.add_argument_group("large images", "train on region-guided crops read from each image's on-disk pyramid "
                                             "instead of whole letterboxed images (mammograms, slides)")
    g.add_argument("--crop-level", type=int, metavar="N", help="pyramid level of the crops (0 = full resolution)")
    g.add_argument("--crop-spacing", type=float, metavar="MM",
                   help="or: the coarsest level whose pixels are at most this size in mm")
    g.add_argument("--crops-per-image", type=int, help="crops of each image per epoch (default 16)")
    g.add_argument("--crop-region-fraction", type=float,
                   help="share of crops centred on the region mask, 0-1 (default 0.9)")
    g = p.add_argument_group("method")
    g.add_argument("--preset", help="named settings: quick-cpu (64 px SimMIM, learns in a minute on a CPU), "
                   "rgmim-paper (ViT-B/16, RGMIM Table 1) or cpu (the defaults)")
    g.add_argument("--method", choices=("mae", "simmim", "miram"))
    g.add_argument("--strategy", choices=("random", "block", "region"),
                   help="masking (default: random for mae/miram, block for simmim)")
    g.add_argument("--ratio", type=float, help="fraction of patches masked (default 0.75; simmim 0.6)")
    g.add_argument("--model", help="timm ViT name (default vit_tiny_patch16_224)")
    g.add_argument("--img-size", help="training size: N or HxW (default 224)")
    g.add_argument("--patch-size", type=int)
    g.add_argument("--embed-dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--decoder-dim", type=int, help="decoder width (default 128)")
    g.add_argument("--decoder-depth", type=int, help="decoder blocks (default 4)")
    g.add_argument("--decoder-heads", type=int, help="decoder attention heads (default 4)")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="per-patch normalised targets (MAE)")
    g.add_argument("--init", help="start from these encoder weights (export, checkpoint or timm state dict)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch per step, split over processes (default 16)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--lr", type=float, help="absolute learning rate (default blr x batch x accum / 256)")
    g.add_argument("--blr", type=float, help="base learning rate (default 1.5e-4)")
    g.add_argument("--min-lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--clip-grad", type=float, help="gradient-norm clipping (default off; 5 for simmim)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision: CUDA bf16/fp16 (default auto); on the CPU bf16 where it has AMX/AVX512-BF16 "
                        "(auto = bf16 with AMX for encoders at least 192 wide, else fp32)")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training forward (the first step compiles, ~1 min on a small CPU; "
                        "falls back to eager if compiling fails)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (config.json, metrics.csv, ckpt-<step>/)")
    g.add_argument("--resume", help="continue a run: its directory or a checkpoint")
    g.add_argument("--config", help="settings file (JSON or TOML); flags override it")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--seed", type=int)
    g.add_argument("--max-steps", type=int, help="stop after this many steps (schedule unchanged)")
    g.add_argument("--time-budget", type=float, metavar="S", help="stop after S seconds of training")
    g.add_argument("--checkpoint-every", help='steps between checkpoints, or "epoch" (default)')
    g.add_argument("--keep-checkpoints", type=int, help="keep the N newest checkpoints (0 = all; default 3)")
    g.add_argument("--preview-every", type=int, help="steps between preview pictures (0 = never)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return _run_pretrain


def pretrain_config_from_args(args: argparse.Namespace):
    """PretrainConfig from ``--config`` (if any) overlaid with the flags given."""
    from .training.config import PretrainConfig, read_config_file

    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    skip = {"command", "config", "quiet"}
    for dest, value in vars(args).items():
        if dest in skip or value is None:
            continue
        field = _PRETRAIN_FIELD.get(dest, dest)
        if field == "checkpoint_every" and str(value).isdigit():
            value = int(value)
        values[field] = value
    return PretrainConfig.from_dict(values)


class _StopOnSignal:
    """Control for the CLI: the first Ctrl-C asks for a clean stop, the second interrupts."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._old: Any = None

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def pause_requested(self) -> bool:
        return False

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt
        self._stop.set()
        print("\nmim-workbench pretrain: stopping after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .training.pretrain import pretrain
    from .training.progress import ProgressPrinter

    config = pretrain_config_from_args(args)
    printer = None if args.quiet else ProgressPrinter()
    with _StopOnSignal() as control:
        result = pretrain(config, on_event=printer, control=control)
    # Under torchrun only rank 0 writes checkpoints; the other ranks succeed without one.
    rank = int(os.environ.get("RANK", "0"))
    return 0 if result.last_checkpoint or rank != 0 else 1


# ===================================================================== reconstruct
def _add_reconstruct(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("reconstruct", help="mask an image, reconstruct it, write pictures and metrics.json")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, a file in it, or a run directory")
    p.add_argument("--image", required=True, help="image file (DICOM, PNG, TIFF, ...)")
    p.add_argument("--mask", help="region mask for --strategy region")
    p.add_argument("--strategy", choices=("random", "block", "region"), help="default: as in training")
    p.add_argument("--ratio", type=float, help="fraction of patches masked (default: as in training)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("large images (tiled, streamed to zarr)")
    g.add_argument("--tiled", action="store_true",
                   help="whole image by overlapping model-sized tiles from its pyramid; writes OUT/maps.zarr")
    g.add_argument("--level", type=int, default=0, help="pyramid level to reconstruct (0 = full resolution)")
    g.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    g.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass (default 8)")
    g.add_argument("--region-preset", help="propose the region mask at a low level (breast, tissue, ...) "
                   "instead of --mask")
    return _run_reconstruct


def _run_reconstruct(args: argparse.Namespace) -> int:
    from .inference.reconstruct import json_safe, reconstruct
    from .training.checkpoint import load_checkpoint
    from .training.runtime import select_device

    ckpt = load_checkpoint(args.checkpoint)
    device = select_device(args.device)
    if args.tiled:
        return _run_reconstruct_tiled(args, ckpt, device)
    res = reconstruct(ckpt, args.image, region_mask=args.mask, strategy=args.strategy, ratio=args.ratio,
                      seed=args.seed, device=device)
    extra = {"checkpoint": str(ckpt.path), "step": ckpt.step, "image": str(Path(args.image)),
             "mask": str(Path(args.mask)) if args.mask else None}
    res.save(args.out, extra=extra)
    for note in res.metrics.get("notes", []):
        print(f"mim-workbench reconstruct: note: {note}", file=sys.stderr)
    summary = {k: res.metrics[k] for k in ("mse", "psnr", "mse_baseline", "psnr_baseline")}
    print(json.dumps(json_safe(summary)))
    return 0


def _run_reconstruct_tiled(args: argparse.Namespace, ckpt: Any, device: Any) -> int:
    from .inference.reconstruct import json_safe
    from .inference.tiled_reconstruct import reconstruct_tiled, write_metrics
    from .io.pyramid import open_pyramid

    pyr = open_pyramid(args.image)
    region = None
    if args.region_preset:
        from .regions.large import propose_region_large

        region = propose_region_large(pyr, args.region_preset)
    elif args.mask:
        from .io import read_mask

        m = read_mask(args.mask)  # painted at any level: it spans the whole image
        region = (m, (pyr.scale(0)[0] * pyr.shape[0] / m.shape[0], pyr.scale(0)[1] * pyr.shape[1] / m.shape[1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(band: Any) -> None:
        print(f"mim-workbench reconstruct: rows {band.row1}, tiles {band.tiles_done}/{band.tiles_total}",
              file=sys.stderr, flush=True)

    res = reconstruct_tiled(ckpt, pyr, out=out / "maps.zarr", level=args.level, region_mask=region,
                            strategy=args.strategy, ratio=args.ratio, overlap=args.overlap,
                            batch_size=args.batch_size, seed=args.seed, device=device, on_band=progress)
    write_metrics(res, out / "metrics.json", extra={"checkpoint": str(ckpt.path), "image": str(Path(args.image))})
    summary = {k: res.metrics.get(k) for k in ("mse", "psnr", "mse_baseline", "psnr_baseline", "tiles")}
    print(json.dumps(json_safe({**summary, "maps": str(out / "maps.zarr")})))
    return 0


# ===================================================================== export
def _add_export(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("export", help="write a checkpoint's bare encoder as timm-loadable safetensors")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, a file in it, or a run directory")
    p.add_argument("--out", required=True, help="output .safetensors file (or a folder: encoder.safetensors in it)")
    return _run_export


def _run_export(args: argparse.Namespace) -> int:
    from .inference.reconstruct import model_from_checkpoint
    from .models import export_encoder

    model, ckpt = model_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.is_dir():
        out = out / "encoder.safetensors"
    path = export_encoder(model, out)
    print(str(path))
    print(f"mim-workbench export: encoder of {ckpt.path} (step {ckpt.step}, {model.cfg.model}) -> {path}",
          file=sys.stderr)
    return 0


# ===================================================================== cache
def _add_cache(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("cache", help="the decoded-image cache: info | clear")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--dir", help="cache folder (default $MIM_WORKBENCH_CACHE or ~/.cache/mim-workbench/decoded)")
    return _run_cache


def _run_cache(args: argparse.Namespace) -> int:
    from .io.cache import DecodeCache

    cache = DecodeCache(args.dir) if args.dir else DecodeCache()
    if args.action == "info":
        print(json.dumps({"root": str(cache.root), "entries": len(cache), "bytes": cache.size_bytes(),
                          "max_bytes": cache.max_bytes}))
    else:
        freed = cache.clear()
        print(json.dumps({"root": str(cache.root), "freed_bytes": freed}))
    return 0


ENGINE_COMMANDS: list[Callable[[argparse._SubParsersAction], Runner]] = [
    _add_pretrain, _add_reconstruct, _add_export, _add_cache,
]
