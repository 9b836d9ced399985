"""Reconstruction and error maps of a whole large image, tile by tile, on disk.

    for band in iter_reconstruct_tiled(ckpt, "mammo.dcm", out="recon.zarr", level=0):
        ...                      # rows band.row0:band.row1 of every map are written
    result = reconstruct_tiled(ckpt, "mammo.dcm", out="recon.zarr")   # the same, run to the end

The image is read from its pyramid (:mod:`mim_workbench.io.pyramid`) at ``level``
-- use the level the model was pretrained on (``crop_level``).  Every
model-sized tile is masked (seeded per tile, region-guided when a region mask is
given), reconstructed, and blended into two maps (:mod:`.tiling`):

* ``reconstruction``: each pixel's prediction from the tiles that *masked* it
  (what the model infers from context), the input where no tile masked it;
* ``error``: squared error of those predictions (0 where never masked).

Both are float32 OME-Zarr multiscale pyramids under ``out`` (napari opens them
as multiscale layers); memory stays at one band of tiles.  ``metrics`` are the
masked-pixel MSE / PSNR over all tiles, next to filling each tile's masked
pixels with the mean of its visible ones (see :mod:`.reconstruct`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .reconstruct import _DEFAULT_RATIO, _DEFAULT_STRATEGY, model_from_checkpoint, psnr
from .tiling import Band, TiledOutput, band_rows, create_output, run_tiled, tiles_to_tensor

OUTPUTS = ["reconstruction", "error"]


@dataclass
class TiledReconstruction:
    output: TiledOutput
    level: int
    tiles: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _load(checkpoint_or_model: Any, device: str | torch.device) -> tuple[Any, dict]:
    from ..models import MIMModel

    if isinstance(checkpoint_or_model, MIMModel):
        return checkpoint_or_model, {}
    model, ckpt = model_from_checkpoint(checkpoint_or_model, device)
    return model, dict(ckpt.config or {})


@torch.no_grad()
def iter_reconstruct_tiled(
    checkpoint_or_model: Any,
    image: Any,
    *,
    out: str | os.PathLike,
    level: int = 0,
    region_mask: Any = None,
    strategy: str | None = None,
    ratio: float | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    stats: dict[str, Any] | None = None,
) -> Iterator[Band]:
    """Generator form of :func:`reconstruct_tiled`: yields each finished band of rows.

    ``image``: a path or a :class:`~mim_workbench.io.pyramid.Pyramid`.
    ``region_mask``: a :class:`~mim_workbench.regions.large.LevelMask`, or a
    (mask, scale) pair in the pyramid's scale units, for the ``region`` strategy.
    ``stats`` (a dict) receives ``output`` (the :class:`TiledOutput`) before the
    first band, and ``tiles`` and the metrics when the run ends.
    """
    from ..io.level_masks import mask_window
    from ..masking import patch_coverage
    from ..io.pyramid import Pyramid, open_pyramid

    model, train_cfg = _load(checkpoint_or_model, device)
    dev = next(model.parameters()).device
    pyr = image if isinstance(image, Pyramid) else open_pyramid(image, keep_color=model.in_chans == 3)
    if not 0 <= level < len(pyr.levels):
        raise ConfigError(f"level={level}: the pyramid has levels 0..{len(pyr.levels) - 1}")
    method = model.cfg.method
    strategy = strategy or train_cfg.get("strategy") or _DEFAULT_STRATEGY[method]
    ratio = float(ratio if ratio is not None else (train_cfg.get("ratio") or _DEFAULT_RATIO[method]))
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio={ratio!r}: must be a fraction strictly between 0 and 1")
    mask_img, mask_scale = None, None
    if region_mask is not None:
        if hasattr(region_mask, "mask"):
            mask_img, mask_scale = np.asarray(region_mask.mask), tuple(region_mask.scale)
        else:
            mask_img, mask_scale = np.asarray(region_mask[0]), tuple(region_mask[1])
    if strategy == "region" and mask_img is None:
        raise ConfigError("strategy region needs a region mask (e.g. propose_region_large(image, 'breast'))")
    opts = dict(train_cfg.get("mask_options") or {})
    opts = {k: v for k, v in opts.items() if strategy == "region" or k not in ("min_overlap", "ratio_of")}
    if strategy != "block":
        opts.pop("mask_patch_size", None)

    th, tw = model.cfg.img_size
    H, W = pyr.level_shape(level)
    lscale = pyr.scale(level)
    C = model.in_chans
    s = int(getattr(model.cfg, "miram_scale", 1) or 1)
    output = create_output(out, OUTPUTS, (H, W), scale=lscale, attrs={
        "source": pyr.meta.source, "level": level, "strategy": strategy, "ratio": ratio, "seed": seed,
        "overlap": overlap, "tile": [th, tw], "method": method,
    }, chunk_rows=band_rows(th, overlap))
    if stats is not None:  # before the first band: a GUI opens the maps while they are being written
        stats["output"] = output
    acc = {"se": 0.0, "se_base": 0.0, "n": 0, "tiles": 0}

    def fn(tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x = tiles_to_tensor(tiles, C, dev)                                    # [B, C, th, tw]
        B = x.shape[0]
        region = None
        if mask_img is not None:
            win = [mask_window(mask_img, mask_scale, (r, r + th), (c, c + tw), lscale) for r, c in origins]
            region = torch.from_numpy(np.stack(win).astype(np.float32))
            region = patch_coverage(region, model.patch_size)  # once per batch, not once per tile
        # one generator per tile origin: the mask of a tile does not depend on batching
        masks = []
        with warnings.catch_warnings():  # background tiles have no region: masked at random, as intended
            warnings.simplefilter("ignore")
            for k, (r, c) in enumerate(origins):
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + r * 65_537 + c)
                masks.append(model.make_mask(strategy, 1, ratio, generator=g, **opts,
                                             region=None if region is None else region[k:k + 1]))
        mask = torch.cat(masks).to(dev)
        fine = None
        if method == "miram":  # the loss needs it; the maps do not: the finer level when there is one
            fine = _fine_tiles(pyr, level, origins, (th, tw), s, x)
        out = model(x, mask, fine=fine)
        r = model.render(out, x)
        truth = x.float().mean(dim=1)                                          # [B, th, tw]
        pred = r.recon_plus_visible.float().mean(dim=1)
        m = (r.mask[:, 0] > 0.5).float()                                       # [B, th, tw] masked pixels
        err = (pred - truth) ** 2 * m
        # metrics on masked pixels inside the image, against the visible-mean fill
        inside = torch.zeros_like(m)
        for k, (r0, c0) in enumerate(origins):
            inside[k, : max(0, min(th, H - r0)), : max(0, min(tw, W - c0))] = 1.0
        sel = m * inside
        vis = (1 - m) * inside
        fill = (truth * vis).sum(dim=(1, 2)) / vis.sum(dim=(1, 2)).clamp_min(1)
        acc["se"] += float((err * inside).sum())
        acc["se_base"] += float((((fill[:, None, None] - truth) ** 2) * sel).sum())
        acc["n"] += int(sel.sum())
        acc["tiles"] += B
        factor = (m + 1e-3 * (1 - m)).cpu().numpy()  # predictions of masked pixels dominate the blend
        return {"reconstruction": pred.cpu().numpy(), "error": err.cpu().numpy()}, factor

    def read_rows(r0: int, r1: int) -> np.ndarray:
        return pyr.read(level, (r0, r1), (0, W))

    was_training = model.training
    model.eval()
    try:
        yield from run_tiled(read_rows, (H, W), (th, tw), fn, output, overlap=overlap, batch_size=batch_size)
    finally:
        model.train(was_training)
    n = acc["n"]
    metrics: dict[str, Any] = {"n_pixels": n, "tiles": acc["tiles"], "level": level, "strategy": strategy,
                               "ratio": ratio}
    if n:
        mse, mse_b = acc["se"] / n, acc["se_base"] / n
        metrics.update(mse=mse, psnr=psnr(mse), mse_baseline=mse_b, psnr_baseline=psnr(mse_b))
    if stats is not None:
        stats.update(output=output, level=level, tiles=acc["tiles"], metrics=metrics)


def _fine_tiles(pyr: Any, level: int, origins: list[tuple[int, int]], tile: tuple[int, int], s: int,
                x: torch.Tensor) -> torch.Tensor:
    th, tw = tile
    step = int(math.log2(s)) if s > 1 else 0
    if level >= step and 2 ** step == s:
        fl = level - step
        fy = pyr.factor(level)[0] / pyr.factor(fl)[0]
        fx = pyr.factor(level)[1] / pyr.factor(fl)[1]
        tiles = [pyr.read(fl, (round(r * fy), round(r * fy) + s * th), (round(c * fx), round(c * fx) + s * tw))
                 for r, c in origins]
        t = torch.from_numpy(np.stack(tiles)).float()
        t = t.permute(0, 3, 1, 2).mean(dim=1, keepdim=True) if t.ndim == 4 else t[:, None]
        return t.expand(-1, x.shape[1], -1, -1).contiguous().to(x.device)
    return torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)


def reconstruct_tiled(checkpoint_or_model: Any, image: Any, *, out: str | os.PathLike,
                      on_band: Callable[[Band], None] | None = None, **options: Any) -> TiledReconstruction:
    """Run :func:`iter_reconstruct_tiled` to the end; ``on_band`` sees every finished band."""
    stats: dict[str, Any] = {}
    for band in iter_reconstruct_tiled(checkpoint_or_model, image, out=out, stats=stats, **options):
        if on_band is not None:
            on_band(band)
    return TiledReconstruction(output=stats["output"], level=stats["level"], tiles=stats["tiles"],
                               metrics=stats["metrics"])


def write_metrics(result: TiledReconstruction, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    import json

    from .reconstruct import json_safe

    p = Path(path)
    record = {**result.metrics, **(extra or {}), "output": str(result.output.path), "shape": list(result.output.shape),
              "scale": list(result.output.scale)}
    p.write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
    return p
