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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from .reconstruct import CheckpointLike, load_model, mask_options, mask_settings, psnr
from .tiling import Band, TiledOutput, band_rows, create_output, drain, open_level, stream_level, tiles_to_tensor

if TYPE_CHECKING:
    from ..io.pyramid import Pyramid
    from ..models import MIMModel
    from ..regions.large import LevelMask

OUTPUTS = ["reconstruction", "error"]


@dataclass
class TiledReconstruction:
    """What :func:`reconstruct_tiled` wrote (``output``) and how well the model did (``metrics``)."""

    output: TiledOutput
    level: int
    tiles: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Masking:
    """How every tile is masked: the resolved settings and the region mask, if any."""

    strategy: str
    ratio: float
    options: dict[str, Any]
    seed: int
    region: np.ndarray | None = None                    # the region mask, in pyramid scale units ...
    region_scale: tuple[float, float] | None = None     # ... at this scale


def _masking(model: MIMModel, train_cfg: dict[str, Any], strategy: str | None, ratio: float | None,
             region_mask: LevelMask | tuple[np.ndarray, tuple[float, float]] | None, seed: int) -> _Masking:
    """Resolve the mask settings; raises ConfigError for the ``region`` strategy without a region mask."""
    strategy, ratio = mask_settings(model.cfg.method, train_cfg, strategy, ratio)
    plan = _Masking(strategy, ratio, {}, seed)
    if region_mask is not None:
        if hasattr(region_mask, "mask"):
            plan.region, plan.region_scale = np.asarray(region_mask.mask), tuple(region_mask.scale)
        else:
            plan.region, plan.region_scale = np.asarray(region_mask[0]), tuple(region_mask[1])
    if strategy == "region" and plan.region is None:
        raise ConfigError("strategy region needs a region mask (e.g. propose_region_large(image, 'breast'))")
    plan.options = mask_options(train_cfg, strategy)
    return plan


@dataclass
class _Tally:
    """Squared errors on masked pixels inside the image, of the model and of the visible-mean fill."""

    se: float = 0.0
    se_base: float = 0.0
    n: int = 0

    def metrics(self, tiles: int, level: int, masking: _Masking) -> dict[str, Any]:
        """Masked-pixel count, tiles, level and masking; when pixels were masked, also MSE and PSNR (dB)
        of the model and of the visible-mean fill (``*_baseline``)."""
        metrics: dict[str, Any] = {"n_pixels": self.n, "tiles": tiles, "level": level,
                                   "strategy": masking.strategy, "ratio": masking.ratio}
        if self.n:
            mse, mse_b = self.se / self.n, self.se_base / self.n
            metrics.update(mse=mse, psnr=psnr(mse), mse_baseline=mse_b, psnr_baseline=psnr(mse_b))
        return metrics


class _ReconstructTiles:
    """The tile function: mask, reconstruct and score a batch of tiles (see :data:`.tiling.TileFn`)."""

    def __init__(self, model: MIMModel, pyr: Pyramid, level: int, masking: _Masking, tally: _Tally) -> None:
        self.model, self.pyr, self.level, self.masking, self.tally = model, pyr, level, masking, tally
        self.device = next(model.parameters()).device
        self.tile = tuple(model.cfg.encoder.img_size)
        self.shape = pyr.level_shape(level)

    def __call__(self, tiles: np.ndarray, origins: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        model = self.model
        x = tiles_to_tensor(tiles, model.in_chans, self.device)              # [B, C, th, tw]
        mask = self._masks(origins).to(self.device)
        fine = None
        if model.cfg.method == "miram":  # the loss needs it; the maps do not: the finer level when there is one
            s = int(getattr(model.cfg, "miram_scale", 1) or 1)
            fine = _fine_tiles(self.pyr, self.level, origins, self.tile, s, x)
        r = model.render(model(x, mask, fine=fine), x)
        truth = x.float().mean(dim=1)                                          # [B, th, tw]
        pred = r.recon_plus_visible.float().mean(dim=1)
        m = (r.mask[:, 0] > 0.5).float()                                       # [B, th, tw] masked pixels
        err = (pred - truth) ** 2 * m
        self._score(truth, err, m, origins)
        factor = (m + 1e-3 * (1 - m)).cpu().numpy()  # predictions of masked pixels dominate the blend
        return {"reconstruction": pred.cpu().numpy(), "error": err.cpu().numpy()}, factor

    def _masks(self, origins: list[tuple[int, int]]) -> torch.Tensor:
        """``[B, L]`` masks, one generator per tile origin: a tile's mask does not depend on batching."""
        from ..io.level_masks import mask_window
        from ..masking import patch_coverage

        plan, model = self.masking, self.model
        th, tw = self.tile
        region = None
        if plan.region is not None:
            lscale = self.pyr.scale(self.level)
            win = [mask_window(plan.region, plan.region_scale, (r, r + th), (c, c + tw), lscale) for r, c in origins]
            region = torch.from_numpy(np.stack(win).astype(np.float32))
            region = patch_coverage(region, model.patch_size)  # once per batch, not once per tile
        masks = []
        with warnings.catch_warnings():  # background tiles have no region: masked at random, as intended
            warnings.simplefilter("ignore")
            for k, (r, c) in enumerate(origins):
                g = torch.Generator().manual_seed(int(plan.seed) * 1_000_003 + r * 65_537 + c)
                masks.append(model.make_mask(plan.strategy, 1, plan.ratio, generator=g, **plan.options,
                                             region=None if region is None else region[k:k + 1]))
        return torch.cat(masks)

    def _score(self, truth: torch.Tensor, err: torch.Tensor, m: torch.Tensor, origins: list[tuple[int, int]]) -> None:
        """Add the batch's masked pixels inside the image to the tally, against the visible-mean fill."""
        (th, tw), (H, W) = self.tile, self.shape
        inside = torch.zeros_like(m)
        for k, (r0, c0) in enumerate(origins):
            inside[k, : max(0, min(th, H - r0)), : max(0, min(tw, W - c0))] = 1.0
        sel = m * inside
        vis = (1 - m) * inside
        fill = (truth * vis).sum(dim=(1, 2)) / vis.sum(dim=(1, 2)).clamp_min(1)
        self.tally.se += float((err * inside).sum())
        self.tally.se_base += float((((fill[:, None, None] - truth) ** 2) * sel).sum())
        self.tally.n += int(sel.sum())


def _create_maps(out: str | os.PathLike, model: MIMModel, pyr: Pyramid, level: int, masking: _Masking,
                 overlap: float) -> TiledOutput:
    """The empty output group, its attributes saying how the maps are made."""
    th, tw = model.cfg.encoder.img_size
    return create_output(out, OUTPUTS, pyr.level_shape(level), scale=pyr.scale(level), attrs={
        "source": pyr.meta.source, "level": level, "strategy": masking.strategy, "ratio": masking.ratio,
        "seed": masking.seed, "overlap": overlap, "tile": [th, tw], "method": model.cfg.method,
    }, chunk_rows=band_rows(th, overlap))


@torch.no_grad()
def iter_reconstruct_tiled(
    checkpoint_or_model: CheckpointLike | MIMModel,
    image: str | os.PathLike | Pyramid,
    *,
    out: str | os.PathLike,
    level: int = 0,
    region_mask: LevelMask | tuple[np.ndarray, tuple[float, float]] | None = None,
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
    first band, and ``tiles`` and the metrics when the run ends.  Raises ConfigError
    for a level the pyramid lacks, a ratio outside (0, 1), or the ``region``
    strategy without a region mask.
    """
    model, train_cfg = load_model(checkpoint_or_model, device)
    pyr = open_level(image, level, keep_color=model.in_chans == 3)
    masking = _masking(model, train_cfg, strategy, ratio, region_mask, seed)
    output = _create_maps(out, model, pyr, level, masking, overlap)
    if stats is not None:  # before the first band: a GUI opens the maps while they are being written
        stats["output"] = output
    tally = _Tally()
    fn = _ReconstructTiles(model, pyr, level, masking, tally)
    tiles = yield from stream_level(pyr, level, fn.tile, fn, output, net=model, overlap=overlap,
                                    batch_size=batch_size)
    if stats is not None:
        stats.update(output=output, level=level, tiles=tiles, metrics=tally.metrics(tiles, level, masking))


def _fine_tiles(pyr: Pyramid, level: int, origins: list[tuple[int, int]], tile: tuple[int, int], s: int,
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


def reconstruct_tiled(checkpoint_or_model: CheckpointLike | MIMModel, image: str | os.PathLike | Pyramid, *,
                      out: str | os.PathLike, on_band: Callable[[Band], None] | None = None,
                      **options: Any) -> TiledReconstruction:
    """Run :func:`iter_reconstruct_tiled` (``options`` are its keywords) to the end; ``on_band`` sees every band."""
    stats: dict[str, Any] = {}
    drain(iter_reconstruct_tiled(checkpoint_or_model, image, out=out, stats=stats, **options), on_band)
    return TiledReconstruction(output=stats["output"], level=stats["level"], tiles=stats["tiles"],
                               metrics=stats["metrics"])


def write_metrics(result: TiledReconstruction, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``result``'s metrics (plus ``extra`` and where the maps are) as JSON to ``path``; returns it."""
    import json

    from ..io.meta import json_safe

    p = Path(path)
    record = {**result.metrics, **(extra or {}), "output": str(result.output.path), "shape": list(result.output.shape),
              "scale": list(result.output.scale)}
    p.write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
    return p
