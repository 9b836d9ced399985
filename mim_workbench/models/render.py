"""Turn a forward pass into pictures in image space (GUI previews, ``reconstruct``).

Rules:
* masked patches are only ever filled with the model's predictions, de-normalised
  with the model's *predicted* statistics when ``norm_pix_loss`` is on - the true
  statistics of a masked patch are never used (that would leak the answer into
  the picture and into any PSNR computed from it);
* ``masked`` shows the input with masked patches set to ``fill`` (default 0.5, a
  mid grey, which stands out against both black background and bright bone);
* ``reconstruction`` is what the model produced: every patch for models that
  predict every patch (SimMIM), otherwise predicted masked patches with the visible
  pixels kept - for MAE/MIRAM it therefore equals ``recon_plus_visible``;
* ``recon_plus_visible`` is the input with masked patches replaced by predictions;
* ``error`` is the per-patch MSE between prediction and truth on masked patches,
  broadcast to the patch's pixels, 0 on visible patches, one channel ``[B, 1, H, W]``
  (the MSE is over all channels of the patch); ``patch_mse`` is the same on the grid.

For BEiT, ``tokens`` and ``tokens_pred`` are the true and the predicted token maps drawn
through the codebook (each patch as its token's mean patch; visible patches keep their
true token in the predicted map) and the predictions above are those drawings.  For
latent-feature targets nothing is drawn in pixels: ``reconstruction`` is the masked input,
``similarity`` the cosine of predicted and teacher features on masked patches and
``error`` one minus it.

Values are not clipped to [0, 1], so metrics see what the model really predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .output import MIMOutput
from .patches import denormalise_patches, gather_patches, patchify, unpatchify


class PatchGrid(Protocol):
    """What rendering needs of a model (every :class:`~.base.MIMModel` has it)."""

    patch_size: int            # p, pixels
    in_chans: int              # C
    grid: tuple[int, int]      # (gh, gw) patches
    cfg: ModelConfig           # ``miram_scale`` for the fine picture


#: the methods' own pictures in a :class:`Rendered`, by field, with the name they are shown under
METHOD_PICTURES = (("tokens", "tokens"), ("tokens_pred", "predicted tokens"), ("similarity", "similarity"))


@dataclass
class Rendered:
    """Detached float32 pictures; images ``[B, C, H, W]`` unless stated."""

    masked: torch.Tensor
    reconstruction: torch.Tensor
    recon_plus_visible: torch.Tensor
    error: torch.Tensor                               # [B, 1, H, W]
    patch_mse: torch.Tensor                           # [B, gh, gw], 0 on visible patches
    mask: torch.Tensor                                # [B, 1, H, W], 1.0 on masked pixels
    fine_reconstruction: torch.Tensor | None = None   # [B, C, s*H, s*W] (MIRAM)
    tokens: torch.Tensor | None = None                # [B, C, H, W] true token map (BEiT)
    tokens_pred: torch.Tensor | None = None           # [B, C, H, W] predicted token map (BEiT)
    similarity: torch.Tensor | None = None            # [B, 1, H, W], cosine on masked patches, 0 elsewhere


def _to_pixels(pred: torch.Tensor, stats: torch.Tensor | None, normalized: bool, chans: int) -> torch.Tensor:
    """Predictions ``[B, M, F]`` in target space -> pixels, using predicted statistics only."""
    if not normalized:
        return pred
    if stats is None:
        raise ValueError("normalised predictions need predicted statistics to be rendered")
    return denormalise_patches(pred, stats[..., :chans], stats[..., chans:], chans)


def _scatter_rows(base: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy of ``base [B, L, F]`` with rows ``ids [B, M]`` replaced by ``rows [B, M, F]``."""
    return base.scatter(1, ids[..., None].expand(-1, -1, base.shape[-1]), rows)


def _upsample_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, gh, gw]`` -> ``[B, 1, gh*p, gw*p]`` by repetition."""
    return x[:, None].repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


@torch.no_grad()
def render(model: PatchGrid, out: MIMOutput, images: torch.Tensor, *, fill: float = 0.5) -> Rendered:
    """Pictures for ``out`` (from ``model(images, mask)``, ``images [B, C, H, W]``); see the module docstring.

    Returns detached float32 tensors on ``images``' device.  Raises ``ValueError`` when
    ``out`` holds normalised predictions without predicted statistics.
    """
    if out.pred is None:
        return _render_latent(model, out, images, fill=fill)
    p, C, grid = model.patch_size, model.in_chans, model.grid
    B = images.shape[0]
    images = images.detach().float()
    truth = patchify(images, p)                                                       # [B, L, C*p*p]
    ids = out.ids_masked                                                              # [B, M]
    pred_px = _to_pixels(out.pred.detach().float(),
                         None if out.pred_stats is None else out.pred_stats.detach().float(),
                         out.normalized, C)                                           # [B, M, C*p*p]

    recon_vis = _scatter_rows(truth, ids, pred_px)                                    # [B, L, C*p*p]
    if out.full_pred is not None:
        recon = out.full_pred.detach().float()
    else:
        recon = recon_vis
    masked = _scatter_rows(truth, ids, torch.full_like(pred_px, fill))

    err = (pred_px - gather_patches(truth, ids)).pow(2).mean(dim=-1)                  # [B, M]
    patch_mse = torch.zeros(B, grid[0] * grid[1], device=images.device).scatter(1, ids, err)
    patch_mse = patch_mse.view(B, *grid)                                              # [B, gh, gw]
    mask_px = _upsample_patches(out.mask.view(B, *grid).float(), p)                   # [B, 1, H, W]

    fine_rec = None
    if out.fine_pred is not None:
        s = model.cfg.miram_scale
        fp = s * p
        if out.fine is not None:
            base = out.fine.detach().float()      # visible patches: the given fine image
        else:                                     # display only: no fine image, upsample the input
            base = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        fine_px = _to_pixels(out.fine_pred.detach().float(),
                             None if out.fine_stats is None else out.fine_stats.detach().float(),
                             out.normalized, C)                                       # [B, M, C*(sp)^2]
        fine_rec = unpatchify(_scatter_rows(patchify(base, fp), ids, fine_px), fp, grid, C)

    tokens = tokens_pred = None
    if out.tokens is not None and out.tokens_pred is not None:
        draw = model.tokenizer.draw
        tokens = draw(out.tokens, grid).float()
        tokens_pred = draw(out.tokens.scatter(1, ids, out.tokens_pred), grid).float()
    return Rendered(
        masked=unpatchify(masked, p, grid, C),
        reconstruction=unpatchify(recon, p, grid, C),
        recon_plus_visible=unpatchify(recon_vis, p, grid, C),
        error=_upsample_patches(patch_mse, p),
        patch_mse=patch_mse,
        mask=mask_px,
        fine_reconstruction=fine_rec,
        tokens=tokens,
        tokens_pred=tokens_pred,
    )


def _render_latent(model: PatchGrid, out: MIMOutput, images: torch.Tensor, *, fill: float) -> Rendered:
    """Pictures of a latent-feature forward pass: the masked input and the cosine map."""
    p, C, grid = model.patch_size, model.in_chans, model.grid
    B = images.shape[0]
    images = images.detach().float()
    truth = patchify(images, p)                                                       # [B, L, C*p*p]
    ids = out.ids_masked
    masked = unpatchify(_scatter_rows(truth, ids, torch.full_like(gather_patches(truth, ids), fill)), p, grid, C)
    sim = out.similarity.detach().float() if out.similarity is not None else torch.zeros(ids.shape)
    cos = torch.zeros(B, grid[0] * grid[1], device=images.device).scatter(1, ids, sim.to(images.device))
    miss = torch.zeros_like(cos).scatter(1, ids, 1.0 - sim.to(images.device)).view(B, *grid)
    return Rendered(
        masked=masked, reconstruction=masked, recon_plus_visible=masked,
        error=_upsample_patches(miss, p), patch_mse=miss,
        mask=_upsample_patches(out.mask.view(B, *grid).float(), p),
        similarity=_upsample_patches(cos.view(B, *grid), p),
    )
