"""Prediction heads: pixels, per-patch statistics, fine-scale pixels, SimMIM's pixel shuffle."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class StatsHead(nn.Module):
    """Predicts each patch's per-channel mean and log-std from its decoder token.

    With ``norm_pix_loss`` the pixel head regresses normalised patches, which
    cannot be shown as an image without the patch's statistics; using the true
    statistics of a masked patch would leak the answer into the picture and the
    PSNR.  This head lets the model say them itself, for two numbers per channel.
    The bias starts at a prior for images in [0, 1] (mean 0.5, std 0.1) so the
    auxiliary loss starts small instead of pulling the decoder around early on.
    """

    def __init__(self, dim: int, chans: int) -> None:
        super().__init__()
        self.chans = chans
        self.proj = nn.Linear(dim, 2 * chans)
        _xavier(self)
        with torch.no_grad():
            self.proj.bias[:chans].fill_(0.5)
            self.proj.bias[chans:].fill_(math.log(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, Dd]`` -> ``[B, M, 2C]``: means in ``[..., :C]``, log-stds in ``[..., C:]``."""
        return self.proj(x)


class FineHead(nn.Module):
    """MIRAM's fine-scale head: a two-layer MLP from the shared decoder tokens.

    Our choice (documented in :mod:`.miram`): the fine scale shares MAE's decoder
    and gets its own small MLP rather than a second transformer decoder.  The
    hidden layer (2 × decoder width) lifts the rank limit of a single linear map
    from a ``Dd``-wide token to ``(s·p)²·C`` pixels, at a cost that only grows with
    the masked tokens.
    """

    def __init__(self, dim: int, out: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)
        _xavier(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, Dd]`` decoder tokens -> ``[B, M, (s*p)^2*C]`` fine-scale pixels of each masked patch."""
        return self.fc2(self.act(self.fc1(x)))      # [B, M, Dd] -> [B, M, (s*p)^2*C]


class PixelShuffleHead(nn.Module):
    """SimMIM's head: 1×1 conv to ``p²·C`` channels, then ``PixelShuffle(p)`` back to pixels."""

    def __init__(self, embed_dim: int, patch_size: int, chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, patch_size * patch_size * chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch_size)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, D, gh, gw]`` -> ``[B, C, gh*p, gw*p]``."""
        return self.shuffle(self.conv(fmap))


def pixel_head(dim: int, out: int) -> nn.Linear:
    """MAE's ``decoder_pred``: one linear map from a decoder token to a patch's pixels."""
    head = nn.Linear(dim, out)
    _xavier(head)
    return head
