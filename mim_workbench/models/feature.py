"""Latent-feature targets with a momentum teacher, after data2vec (Baevski et al., ICML 2022).

The student (the encoder that is exported and fine-tuned, as data2vec fine-tunes its
student) sees the image with masked patch embeddings replaced by a mask token; the
teacher, an exponential moving average of the student, sees the whole image.  The target
of a masked patch is the average of the teacher's top ``feature_layers`` block outputs
(residual stream), each layer-normalised without affine parameters, then normalised again
(data2vec v1's vision recipe); a linear head regresses it from the student's output
(mean squared error, as data2vec 2.0).  No pixel decoder.

The teacher's momentum rises linearly from ``ema_start`` to ``ema_end`` over the schedule
(:meth:`after_step`, called after every optimiser step).  ``losses`` carries
``target_std``: the targets' spread over patches, which falls towards zero if the
representation collapses.  ``similarity`` is the cosine between prediction and target.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .base import MIMModel, MIMOutput
from .config import ModelConfig
from .encoder import block_outputs, encode_with_mask_token
from .patches import gather_patches


class FeatureModel(MIMModel):
    """data2vec-style latent-feature prediction around a timm ViT encoder."""

    step_metrics = ("target_std",)

    def __init__(self, cfg: ModelConfig, encoder: VisionTransformer) -> None:
        super().__init__(cfg, encoder)
        D = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(D, D)
        self.layers = min(len(encoder.blocks), cfg.feature_layers or max(1, len(encoder.blocks) // 2))
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)

    def encoder_ready(self) -> None:
        """Start the teacher as an exact copy of the (initialised or loaded) student."""
        self.teacher.load_state_dict(self.encoder.state_dict())

    def train(self, mode: bool = True) -> FeatureModel:
        """As ``nn.Module.train``, but the teacher always runs in eval mode (no drop-path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def momentum(self, step: int, total_steps: int) -> float:
        """The teacher's momentum after optimiser step ``step`` of ``total_steps``."""
        t = min(1.0, step / max(1, total_steps))
        return self.cfg.ema_start + t * (self.cfg.ema_end - self.cfg.ema_start)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher towards the student: ``t = m t + (1 - m) s``."""
        m = self.momentum(step, total_steps)
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - m)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` float32 teacher targets of every patch of the whole ``images``."""
        outs = block_outputs(self.teacher, images)[-self.layers:]              # each [B, P+L, D]
        P = self.teacher.num_prefix_tokens
        mean = sum(F.layer_norm(o[:, P:].float(), o.shape[-1:]) for o in outs) / len(outs)
        return F.layer_norm(mean, mean.shape[-1:])

    def forward(self, images: torch.Tensor, mask: torch.Tensor, fine: torch.Tensor | None = None, *,
                target: torch.Tensor | None = None) -> MIMOutput:
        """MSE between predicted and teacher features at masked patches; the teacher sees
        ``target`` (default ``images``) whole, ``fine`` is ignored."""
        self._check(images, mask)
        idx = self._indices(mask, images.device)
        mask_d = mask.to(images.device, non_blocking=True)
        z = encode_with_mask_token(self.encoder, images, mask_d, self.mask_token)   # [B, P+L, D]
        z = z[:, self.encoder.num_prefix_tokens:]                                  # [B, L, D]
        pred = self.head(gather_patches(z, idx.ids_masked)).float()                # [B, M, D]
        goal = gather_patches(self.targets(images if target is None else target), idx.ids_masked)   # [B, M, D]
        loss = F.mse_loss(pred, goal)
        with torch.no_grad():
            spread = goal.std(dim=1).mean()              # over patches, per feature, averaged
            similarity = F.cosine_similarity(pred, goal, dim=-1)                  # [B, M]
        return MIMOutput(
            loss=loss, losses={"feature": loss.detach(), "target_std": spread},
            mask=mask_d, ids_masked=idx.ids_masked, pred=None, normalized=False, similarity=similarity,
        )
