"""A classifier on a pretrained encoder: linear probe or full fine-tuning.

Two heads, as in MAE's ``main_linprobe.py`` / ``main_finetune.py``:

``probe``
    the encoder is frozen (always in eval mode); the feature (see ``DEFAULT_POOL``)
    after the encoder's final norm, then ``BatchNorm1d(affine=False)`` and a linear layer.  The
    parameter-free BatchNorm only standardises the features, so the head stays a
    linear classifier of the frozen features.
``full``
    every weight trains; the feature (the global average of the patch tokens by
    default, after the encoder's final norm), then dropout and a linear layer.  Because
    the pooling is an average, the logit of class ``c`` is exactly the average of
    the per-patch logits ``W_c . token_i + b_c``: :meth:`Classifier.patch_logits`
    returns those, a class-activation map with no approximation.

The encoder is the same timm ``VisionTransformer`` the MIM models wrap, so the
classifier's state dict is ``encoder.*`` (loadable by ``load_encoder_weights``)
plus ``head.*`` (and the BatchNorm's running statistics in probe mode).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..errors import ConfigError
from .config import DEFAULT_POOL, POOLS
from .encoder import encoder_tokens, grid_of

MODES = ("probe", "full")
#: the ``kind`` of a fine-tuned classifier's checkpoint
FINETUNE_KIND = "finetune"


def patch_grid(enc: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens of ``tokens [B, P + L, D]`` as a feature map ``[B, D, gh, gw]``."""
    gh, gw = grid_of(enc)
    x = tokens[:, enc.num_prefix_tokens:]                                  # [B, L, D]
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)


class Classifier(nn.Module):
    """``encoder`` + pooling + head; see the module docstring for the two modes."""

    def __init__(self, encoder: VisionTransformer, num_classes: int, mode: str = "probe", *,
                 dropout: float = 0.0, pool: str | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}: choose probe or full")
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.encoder = encoder
        self.mode = mode
        self.num_classes = int(num_classes)
        D = encoder.embed_dim
        if pool not in (None, *POOLS):
            raise ConfigError(f"pool={pool!r}: choose {' or '.join(POOLS)}")
        self.pool = pool or DEFAULT_POOL
        if encoder.cls_token is None:
            self.pool = "avg"
        self.bn: nn.Module = nn.BatchNorm1d(D, affine=False, eps=1e-6) if mode == "probe" else nn.Identity()
        self.drop = nn.Dropout(dropout) if mode == "full" and dropout > 0 else nn.Identity()
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if mode == "probe" else 2e-5)
        nn.init.zeros_(self.head.bias)
        if mode == "probe":
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Classifier:
        """``nn.Module.train``, except that a probe's frozen encoder always stays in eval mode."""
        super().train(mode)
        if self.mode == "probe":
            self.encoder.eval()  # frozen: no dropout / drop path, ever
        return self

    # ----------------------------------------------------------------- features
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, P + L, D]`` encoder tokens (no gradients through a frozen encoder)."""
        if self.mode == "probe":
            with torch.no_grad():
                return encoder_tokens(self.encoder, images)
        return encoder_tokens(self.encoder, images)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image feature from tokens (class token or patch average)."""
        if self.pool == "token":
            return tokens[:, 0]
        return tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: what the head sees (before BatchNorm); cacheable in probe mode."""
        return self.pooled(self.tokens(images))

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` class logits from features ``[B, D]`` (as :meth:`features` returns; BatchNorm, dropout, head)."""
        return self.head(self.drop(self.bn(feats)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` class logits."""
        return self.logits_from_features(self.features(images))

    # ----------------------------------------------------------------- maps
    @torch.no_grad()
    def patch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, K, gh, gw]``: the head applied to every patch token.

        With average pooling the image logits are exactly the mean of these maps
        (a probe's BatchNorm, in eval mode, is affine); on the class token they
        use its BatchNorm statistics, an approximation.
        """
        tokens = self.tokens(images)
        grid = patch_grid(self.encoder, tokens)                             # [B, D, gh, gw]
        B, D, gh, gw = grid.shape
        flat = grid.permute(0, 2, 3, 1).reshape(-1, D)
        bn_was = self.bn.training
        self.bn.eval()
        try:
            out = self.head(self.bn(flat))
        finally:
            self.bn.train(bn_was)
        return out.reshape(B, gh, gw, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def attention_rollout(self, images: torch.Tensor, *, discard_ratio: float = 0.0) -> torch.Tensor:
        """``[B, gh, gw]`` attention rollout of the encoder from the class token, in [0, 1]
        (see :func:`~mim_workbench.models.attention.rollout`)."""
        from .attention import block_attentions, rollout

        return rollout(self.encoder, block_attentions(self.encoder, images), discard_ratio=discard_ratio)


__all__ = ["MODES", "Classifier", "patch_grid"]
