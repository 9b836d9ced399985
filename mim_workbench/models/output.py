"""The record of one forward pass of a MIM model.

It lives apart from :mod:`.base` so that :mod:`.render` can read it while the base
class renders through :mod:`.render`, with no module importing back the one that
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MIMOutput:
    """Result of one forward pass: the loss, and what rendering/the GUI needs.

    ``pred`` is in *target space*: normalised patches when ``normalized`` is True
    (``norm_pix_loss``), pixels otherwise (BEiT: the predicted tokens drawn as patches);
    None for latent-feature targets, which have no pixels.  Patches are flattened in
    (C, p, p) order.
    """

    loss: torch.Tensor                      # 0-d, requires grad in training
    losses: dict[str, torch.Tensor]         # detached 0-d components ("pixel", "stats", "fine", ...)
    mask: torch.Tensor                      # [B, L] bool, True = masked
    ids_masked: torch.Tensor                # [B, M] patch ids of the rows of pred
    pred: torch.Tensor | None               # [B, M, C*p*p]
    pred_stats: torch.Tensor | None = None  # [B, M, 2C]: predicted mean | log-std per channel
    normalized: bool = False                # pred is per-patch normalised
    full_pred: torch.Tensor | None = None   # [B, L, C*p*p] pixels, for models that predict every patch
    fine_pred: torch.Tensor | None = None   # [B, M, C*(s*p)^2] (MIRAM), target space
    fine_stats: torch.Tensor | None = None  # [B, M, 2C] (MIRAM with norm_pix_loss)
    fine: torch.Tensor | None = field(default=None, repr=False)  # the fine image given to forward
    tokens: torch.Tensor | None = None      # [B, L] true visual tokens of every patch (BEiT)
    tokens_pred: torch.Tensor | None = None  # [B, M] predicted tokens of the masked patches (BEiT)
    similarity: torch.Tensor | None = None  # [B, M] cosine of predicted and target features (feature)
