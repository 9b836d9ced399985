"""MAE (He et al. 2022): encode visible patches only, decode, regress masked pixels.

RGMIM is this model trained with the ``region`` mask strategy.

Per step: patchify once (the pixels serve as both encoder input and target), embed
only the visible patches (a matmul with the patch-embedding kernel), run the
encoder on ``P + V`` tokens, the decoder on every position, and the heads on the
``M`` masked positions only.  With ``norm_pix_loss`` the target is each patch
normalised by its own statistics and a :class:`StatsHead` predicts those
statistics, so reconstructions can be shown in image space honestly.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .base import MIMModel, MIMOutput, masked_regression
from .config import ModelConfig
from .decoder import MAEDecoder
from .encoder import encode_visible
from .heads import StatsHead, pixel_head
from .patches import gather_patches, patchify


class MAEModel(MIMModel):
    """Masked autoencoder around a timm ViT encoder."""

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__(cfg, encoder)
        p, C = self.patch_size, cfg.encoder.in_chans
        self.decoder = MAEDecoder(
            encoder.embed_dim, self.grid, encoder.num_prefix_tokens,
            dim=cfg.decoder_embed_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads,
        )
        self.head = pixel_head(cfg.decoder_embed_dim, p * p * C)
        self.stats_head = StatsHead(cfg.decoder_embed_dim, C) if cfg.norm_pix_loss else None

    def _decode(self, images: torch.Tensor, mask: torch.Tensor):
        """Shared trunk of MAE and MIRAM: returns (patches, indices, masked decoder tokens)."""
        self._check(images, mask)
        idx = self._indices(mask, images.device)
        patches = patchify(images, self.patch_size)                               # [B, L, C*p*p]
        latent = encode_visible(self.encoder, patches, idx.ids_keep, images)      # [B, P+V, D]
        tokens = self.decoder(latent, idx.ids_keep, idx.ids_masked)               # [B, M, Dd]
        return patches, idx, tokens

    def _target(self, patches: torch.Tensor, target: torch.Tensor | None, ids_masked: torch.Tensor):
        if target is not None:
            if target.shape != (patches.shape[0], self.in_chans, *self.cfg.encoder.img_size):
                raise ConfigError(f"target must have the images' shape, got {tuple(target.shape)}")
            patches = patchify(target, self.patch_size)
        return gather_patches(patches, ids_masked)                               # [B, M, C*p*p]

    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:
        """Loss on masked patches.  ``images [B, C, H, W]``, ``mask [B, L]`` bool (True = masked).

        ``fine`` is ignored (MIRAM uses it).  ``target`` (default ``images``) is what
        the masked patches are compared with; the encoder always sees ``images``.
        """
        patches, idx, tokens = self._decode(images, mask)
        pred = self.head(tokens)                                                  # [B, M, C*p*p]
        stats = self.stats_head(tokens) if self.stats_head is not None else None  # [B, M, 2C]
        tgt = self._target(patches, target, idx.ids_masked)                       # [B, M, C*p*p]
        pixel, st = masked_regression(pred, tgt, self.in_chans, norm_pix=self.cfg.norm_pix_loss, stats=stats)
        loss = pixel
        losses = {"pixel": pixel.detach()}
        if st is not None:
            loss = loss + self.cfg.stats_loss_weight * st
            losses["stats"] = st.detach()
        return MIMOutput(
            loss=loss, losses=losses, mask=mask.to(images.device, non_blocking=True), ids_masked=idx.ids_masked,
            pred=pred, pred_stats=stats, normalized=self.cfg.norm_pix_loss,
        )
