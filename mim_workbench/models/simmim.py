"""SimMIM (Xie et al. 2022): mask tokens in the encoder, a pixel-shuffle head, L1 on masked pixels.

The encoder sees every position; masked patch embeddings are replaced by a
learned mask token before the position embedding is added.  The token grid is
reshaped to a feature map and a 1×1 conv + ``PixelShuffle(p)`` turns it back into
pixels.  The loss is L1 over masked pixels divided by (masked pixels × C), as in
SimMIM.  SimMIM regresses raw pixels, so ``norm_pix_loss`` does not apply here
(``pred`` is in pixel space and ``pred_stats`` is None).  Use the ``block``
strategy with ``model.mask_options("block")`` for SimMIM's masking.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .base import MIMModel, MIMOutput
from .config import ModelConfig
from .encoder import encode_with_mask_token
from .heads import PixelShuffleHead
from .patches import gather_patches, patchify


class SimMIMModel(MIMModel):
    """SimMIM around a timm ViT encoder."""

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__(cfg, encoder)
        if cfg.mask_patch_size % self.patch_size:
            raise ConfigError(
                f"mask_patch_size {cfg.mask_patch_size} must be a multiple of the patch size {self.patch_size}"
            )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = PixelShuffleHead(encoder.embed_dim, self.patch_size, cfg.encoder.in_chans)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:
        """L1 loss on masked pixels; ``fine`` is ignored, ``target`` defaults to ``images``."""
        self._check(images, mask)
        idx = self._indices(mask, images.device)
        mask_d = mask.to(images.device, non_blocking=True)
        B = images.shape[0]
        gh, gw = self.grid
        z = encode_with_mask_token(self.encoder, images, mask_d, self.mask_token)   # [B, P+L, D]
        z = z[:, self.encoder.num_prefix_tokens:]                                  # [B, L, D]
        fmap = z.transpose(1, 2).reshape(B, -1, gh, gw)                            # [B, D, gh, gw]
        rec = self.head(fmap)                                                      # [B, C, H, W]
        full = patchify(rec, self.patch_size)                                      # [B, L, C*p*p]
        pred = gather_patches(full, idx.ids_masked)                                # [B, M, C*p*p]
        if target is None:
            target = images
        elif target.shape != images.shape:
            raise ConfigError(f"target must have the images' shape, got {tuple(target.shape)}")
        tgt = gather_patches(patchify(target, self.patch_size), idx.ids_masked)    # [B, M, C*p*p]
        # mean over [B, M, C*p*p] == sum |err| over masked pixels / (masked pixels * C)
        loss = (pred - tgt).abs().mean()
        return MIMOutput(
            loss=loss, losses={"pixel": loss.detach()}, mask=mask_d, ids_masked=idx.ids_masked,
            pred=pred, pred_stats=None, normalized=False, full_pred=full,
        )
