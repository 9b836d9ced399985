"""The dense head: per-patch classifier on encoder features, plus a light conv refinement.

Inputs, for a window of a (working-resolution) image:

* ``grid``: encoder patch features ``[B, D, gh, gw]`` (one vector per p x p patch);
* ``image``: image channels ``[B, C, h, w]`` at pixel resolution (the image and
  smoothed copies of it, see :func:`mim_workbench.models.dense.image_channels`).

Two stages:

1. per patch, a linear classifier ``D -> K`` (``linear``) and a linear
   projection ``D -> F`` (``proj``), both 1x1 convolutions on the grid; their
   outputs are upsampled bilinearly to pixels (a 1x1 convolution commutes with
   bilinear upsampling, so this is the same as classifying upsampled features,
   at a fraction of the memory);
2. with ``refine`` (default), a few dilated 3x3 convolutions on the upsampled
   logits, projected features and image channels add a residual correction to
   the logits: boundaries follow image edges instead of the p-pixel grid.

Without ``refine`` the output is the upsampled per-patch logits.  With
``use_features=False`` the encoder is ignored and the convolutions see only the
image channels: the "image-only" baseline the benchmarks compare against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseHeadNet(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, *, image_channels: int = 3, feat_dim: int = 16,
                 hidden: int = 16, dilations: tuple[int, ...] = (1, 2, 4), refine: bool = True,
                 use_features: bool = True) -> None:
        super().__init__()
        if not (refine or use_features):
            raise ValueError("a dense head needs encoder features, a refinement, or both")
        self.num_classes = int(num_classes)
        self.refine = bool(refine)
        self.use_features = bool(use_features)
        self.image_channels = int(image_channels)
        self.feat_dim = int(feat_dim) if (refine and use_features) else 0
        self.dilations = tuple(int(d) for d in dilations)
        if use_features:
            self.linear = nn.Conv2d(embed_dim, num_classes, 1)
            if self.feat_dim:
                self.proj = nn.Conv2d(embed_dim, self.feat_dim, 1)
        if refine:
            c_in = self.image_channels + (num_classes + self.feat_dim if use_features else 0)
            layers: list[nn.Module] = []
            for d in self.dilations:
                layers += [nn.Conv2d(c_in, hidden, 3, padding=d, dilation=d), nn.GELU()]
                c_in = hidden
            last = nn.Conv2d(c_in, num_classes, 1)
            if use_features:  # a residual on the per-patch logits: start from "no correction"
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
            layers.append(last)
            self.convs = nn.Sequential(*layers)

    @property
    def halo(self) -> int:
        """Receptive-field radius of the refinement in pixels (window overlap needed when tiling)."""
        return sum(self.dilations) if self.refine else 0

    def grid_maps(self, grid: torch.Tensor) -> torch.Tensor | None:
        """``[B, K (+F), gh, gw]``: per-patch logits (and projected features), or None."""
        if not self.use_features:
            return None
        maps = self.linear(grid)
        if self.feat_dim:
            maps = torch.cat([maps, self.proj(grid)], dim=1)
        return maps

    def forward_pixels(self, up: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        """Pixel logits ``[B, K, h, w]`` from upsampled grid maps and image channels.

        With features and refinement the result is the upsampled per-patch logits
        plus the refinement's correction (zero at initialisation).
        """
        if not self.refine:
            assert up is not None
            return up[:, :self.num_classes]
        if up is None:
            return self.convs(image)
        return up[:, :self.num_classes] + self.convs(torch.cat([up, image], dim=1))


def upsample_window(grid: torch.Tensor, patch: int, r0: int, c0: int, h: int, w: int) -> torch.Tensor:
    """Rows ``r0:r0+h``, cols ``c0:c0+w`` of ``grid [B, C, gh, gw]`` upsampled ``patch`` times.

    Equal to slicing ``F.interpolate(grid, scale_factor=patch, mode="bilinear")``
    of the whole grid (half-pixel centres, edges clamped), but only the cells the
    window needs (plus one on each side) are interpolated.  ``r0``/``c0`` may be
    any pixel offsets, the window may extend past the grid (clamped like the edge).
    """
    B, C, gh, gw = grid.shape
    H, W = gh * patch, gw * patch
    # Pixel y samples grid position (y + 0.5) / p - 0.5; the cells involved:
    g0 = max(0, min(gh - 1, (r0 // patch) - 1))
    g1 = max(g0 + 1, min(gh, (min(r0 + h, H) + patch - 1) // patch + 1))
    k0 = max(0, min(gw - 1, (c0 // patch) - 1))
    k1 = max(k0 + 1, min(gw, (min(c0 + w, W) + patch - 1) // patch + 1))
    sub = grid[:, :, g0:g1, k0:k1]
    ys = (torch.arange(r0, r0 + h, device=grid.device, dtype=torch.float32) + 0.5) / patch - 0.5
    xs = (torch.arange(c0, c0 + w, device=grid.device, dtype=torch.float32) + 0.5) / patch - 0.5
    ys = ys.clamp(0, gh - 1) - g0
    xs = xs.clamp(0, gw - 1) - k0
    # grid_sample with align_corners=True: normalised coordinate -1..1 spans the sub-grid's cell centres.
    ny = ys / max(1, sub.shape[2] - 1) * 2 - 1 if sub.shape[2] > 1 else torch.zeros_like(ys)
    nx = xs / max(1, sub.shape[3] - 1) * 2 - 1 if sub.shape[3] > 1 else torch.zeros_like(xs)
    gy, gx = torch.meshgrid(ny, nx, indexing="ij")
    coords = torch.stack([gx, gy], dim=-1)[None].expand(B, -1, -1, -1).to(grid.dtype)
    return F.grid_sample(sub, coords, mode="bilinear", padding_mode="border", align_corners=True)


__all__ = ["DenseHeadNet", "upsample_window"]
