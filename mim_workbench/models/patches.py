"""Patch bookkeeping shared by the objectives and the renderer.

Patches are flattened in (C, p, p) order, i.e. channel-major.  That is the order
of a conv kernel ``[D, C, p, p]`` (so the patch embedding of gathered visible
pixels is one matmul) and of ``nn.PixelShuffle``'s channels (so SimMIM's head
output is already patchified).  MAE uses (p, p, C); the order is internal and
only has to agree between targets, predictions and rendering.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

NORM_EPS = 1e-6  # MAE's epsilon inside sqrt(var + eps) for norm_pix_loss


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, L, C*p*p]`` in raster patch order."""
    B, C, H, W = images.shape
    gh, gw = H // p, W // p
    x = images.reshape(B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 1, 3, 5)             # [B, gh, gw, C, p, p]
    return x.reshape(B, gh * gw, C * p * p)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, L, C*p*p]`` -> ``[B, C, gh*p, gw*p]``."""
    B = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(B, gh, gw, chans, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)             # [B, C, gh, p, gw, p]
    return x.reshape(B, chans, gh * p, gw * p)


def gather_patches(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids [B, K]`` of ``x [B, L, F]`` -> ``[B, K, F]`` (gather with expanded index)."""
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


class PatchStats(NamedTuple):
    mean: torch.Tensor     # [B, K, C]
    log_std: torch.Tensor  # [B, K, C], log sqrt(var + eps)


def normalise_patches(patches: torch.Tensor, chans: int) -> tuple[torch.Tensor, PatchStats]:
    """Per-patch, per-channel normalisation (MAE's ``norm_pix_loss`` target).

    Statistics are taken per channel so that a predicted (mean, std) per channel
    de-normalises exactly; for one channel this is MAE's normalisation verbatim
    (unbiased variance, eps 1e-6).

    Args:
        patches: ``[B, K, C*p*p]``.
    Returns:
        normalised patches ``[B, K, C*p*p]`` and their :class:`PatchStats`.
    """
    B, K, F_ = patches.shape
    x = patches.reshape(B, K, chans, F_ // chans)                 # [B, K, C, p*p]
    var, mean = torch.var_mean(x, dim=-1, keepdim=True)           # [B, K, C, 1]
    std = (var + NORM_EPS).sqrt()
    normed = ((x - mean) / std).reshape(B, K, F_)
    return normed, PatchStats(mean[..., 0], std.log()[..., 0])


def denormalise_patches(normed: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                        chans: int) -> torch.Tensor:
    """Inverse of :func:`normalise_patches` with (predicted) statistics ``[B, K, C]``."""
    B, K, F_ = normed.shape
    x = normed.reshape(B, K, chans, F_ // chans)
    x = x * log_std.exp()[..., None] + mean[..., None]
    return x.reshape(B, K, F_)
