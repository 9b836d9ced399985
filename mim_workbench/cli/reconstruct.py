"""CLI subcommands that apply a pretraining checkpoint: ``reconstruct`` and ``export``.

Each entry of COMMANDS is an ``_add_<name>(sub) -> runner`` as described in
:mod:`mim_workbench.cli`.  Ratios and fractions are 0-1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .args import CPU_DEVICE_HELP, AddCommand, Runner, add_checkpoint, add_device, add_image, add_out

if TYPE_CHECKING:
    from ..inference.tiling import Band


# ===================================================================== reconstruct
def _add_reconstruct(sub: argparse._SubParsersAction) -> Runner:
    p = sub.add_parser("reconstruct", help="mask an image, reconstruct it, write pictures and metrics.json")
    add_checkpoint(p)
    add_image(p, "image file (DICOM, PNG, TIFF, ...)")
    p.add_argument("--mask", help="region mask for --strategy region")
    p.add_argument("--strategy", choices=("random", "block", "region"), help="default: as in training")
    p.add_argument("--ratio", type=float, help="fraction of patches masked (default: as in training)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    add_device(p, "cpu", CPU_DEVICE_HELP)
    add_out(p)
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
    from ..inference.reconstruct import reconstruct
    from ..io.meta import json_safe
    from ..models.checkpoint import load_checkpoint
    from ..training.runtime import select_device

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
    summary = {k: res.metrics[k] for k in ("mse", "psnr", "mse_baseline", "psnr_baseline", "mse_biharmonic",
                                           "psnr_biharmonic", "token_acc", "token_base", "cosine_masked")
               if k in res.metrics}
    print(json.dumps(json_safe(summary)))
    return 0


def _tiled_region(args: argparse.Namespace, pyr: Any) -> Any:
    """The region guiding a tiled reconstruction: proposed by --region-preset, read from --mask, or None."""
    if args.region_preset:
        from ..regions.large import propose_region_large

        return propose_region_large(pyr, args.region_preset)
    if args.mask:
        from ..io import read_mask

        m = read_mask(args.mask)  # painted at any level: it spans the whole image
        return m, (pyr.scale(0)[0] * pyr.shape[0] / m.shape[0], pyr.scale(0)[1] * pyr.shape[1] / m.shape[1])
    return None


def _run_reconstruct_tiled(args: argparse.Namespace, ckpt: Any, device: Any) -> int:
    from ..io.meta import json_safe
    from ..inference.tiled_reconstruct import reconstruct_tiled, write_metrics
    from ..io.pyramid import open_pyramid

    pyr = open_pyramid(args.image)
    region = _tiled_region(args, pyr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(band: Band) -> None:
        """One line on stderr per band written."""
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
    add_checkpoint(p)
    add_out(p, "output .safetensors file (or a folder: encoder.safetensors in it)")
    return _run_export


def _run_export(args: argparse.Namespace) -> int:
    from ..inference.reconstruct import model_from_checkpoint
    from ..models import export_encoder

    model, ckpt = model_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.is_dir():
        out = out / "encoder.safetensors"
    path = export_encoder(model, out)
    print(str(path))
    print(f"mim-workbench export: encoder of {ckpt.path} (step {ckpt.step}, {model.cfg.encoder.model}) -> {path}",
          file=sys.stderr)
    return 0


COMMANDS: list[AddCommand] = [_add_reconstruct, _add_export]
