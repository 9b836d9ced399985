"""MIRAM: MAE that also reconstructs the masked regions at ``s``× the resolution.

Design (our choice; the paper's fine decoder uses linear attention and publishes
no code): the fine scale shares MAE's decoder, and a :class:`FineHead` (two-layer
MLP) maps each *masked* decoder token to its patch at ``s``× resolution,
``(s·p)²·C`` values.  Patch ``(i, j)`` of the coarse grid covers exactly patch
``(i, j)`` of a ``(s·p)``-patch grid on the fine image, so both scales share the
mask and the gather indices.

The fine target comes from ``fine [B, C, s·H, s·W]``, resampled by the data
pipeline from the *source* image; upsampling the input would only teach the
model to interpolate, so forward refuses to run without it.

Loss = ``miram_coarse_weight · coarse + miram_fine_weight · fine`` (+ the
statistics loss of both scales with ``norm_pix_loss``), all on masked patches.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .base import MIMOutput, masked_regression
from .config import ModelConfig
from .heads import FineHead, StatsHead
from .mae import MAEModel
from .patches import gather_patches, patchify


class MIRAMModel(MAEModel):
    """MAE plus a fine-scale head (see module docstring)."""

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__(cfg, encoder)
        self.scale = cfg.miram_scale
        self.fine_patch_size = self.scale * self.patch_size
        Dd, C = cfg.decoder_embed_dim, cfg.encoder.in_chans
        self.fine_head = FineHead(Dd, self.fine_patch_size ** 2 * C)
        self.fine_stats_head = StatsHead(Dd, C) if cfg.norm_pix_loss else None

    @property
    def fine_size(self) -> tuple[int, int]:
        """``(s*H, s*W)``: pixel size of the fine image, ``miram_scale`` times the training size."""
        H, W = self.cfg.encoder.img_size
        return self.scale * H, self.scale * W

    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:
        """Coarse + fine loss.  ``fine [B, C, s*H, s*W]`` is required (from the source image)."""
        if fine is None:
            raise ConfigError(
                f"MIRAM needs the fine image: pass fine=[B, C, {self.fine_size[0]}, {self.fine_size[1]}] "
                f"(the source image at {self.scale}x the training size, e.g. MIMDataset(fine_scale={self.scale}))"
            )
        expected = (images.shape[0], self.in_chans, *self.fine_size)
        if tuple(fine.shape) != expected:
            raise ConfigError(f"fine image must be {list(expected)}, got {list(fine.shape)}")
        cfg = self.cfg
        patches, idx, tokens = self._decode(images, mask)
        C = self.in_chans

        pred = self.head(tokens)                                                      # [B, M, C*p*p]
        stats = self.stats_head(tokens) if self.stats_head is not None else None      # [B, M, 2C]
        tgt = self._target(patches, target, idx.ids_masked)                           # [B, M, C*p*p]
        coarse, st = masked_regression(pred, tgt, C, norm_pix=cfg.norm_pix_loss, stats=stats)

        fine_pred = self.fine_head(tokens)                                            # [B, M, C*(sp)^2]
        fine_stats = self.fine_stats_head(tokens) if self.fine_stats_head is not None else None
        fine_tgt = gather_patches(patchify(fine, self.fine_patch_size), idx.ids_masked)  # [B, M, C*(sp)^2]
        fine_loss, fst = masked_regression(fine_pred, fine_tgt, C, norm_pix=cfg.norm_pix_loss, stats=fine_stats)

        loss = cfg.miram_coarse_weight * coarse + cfg.miram_fine_weight * fine_loss
        losses = {"pixel": coarse.detach(), "fine": fine_loss.detach()}
        if st is not None and fst is not None:
            stats_total = st + fst
            loss = loss + cfg.stats_loss_weight * stats_total
            losses["stats"] = stats_total.detach()
        return MIMOutput(
            loss=loss, losses=losses, mask=mask.to(images.device, non_blocking=True), ids_masked=idx.ids_masked,
            pred=pred, pred_stats=stats, normalized=cfg.norm_pix_loss,
            fine_pred=fine_pred, fine_stats=fine_stats, fine=fine,
        )
