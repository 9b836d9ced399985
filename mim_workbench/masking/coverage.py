"""Per-patch coverage of a region mask: the input of region-guided masking.

The dataset gives a pixel mask of the organ (or lesion) at the training size; the
masking strategies work on the model's patch grid.  Averaging the mask over each
patch keeps *how much* of the patch lies in the region, so the strategy can apply
its own ``min_overlap`` threshold instead of us baking one in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def patch_coverage(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fraction of each ``patch_size`` × ``patch_size`` patch covered by ``mask``.

    Args:
        mask: region mask ``[B, H, W]`` (also ``[H, W]`` or ``[B, 1, H, W]``); bool,
            integer {0, 1} or float in [0, 1].
        patch_size: model patch size in pixels; must divide H and W.

    Returns:
        float32 ``[B, gh, gw]`` in [0, 1] (``[1, gh, gw]`` for a 2-D input), on the
        mask's device.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
    if mask.dim() == 2:
        mask = mask[None]
    elif mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ConfigError(f"region mask must have one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    elif mask.dim() != 3:
        raise ConfigError(f"region mask must be [B, H, W], got shape {tuple(mask.shape)}")
    h, w = mask.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ConfigError(
            f"region mask size {h}x{w} is not divisible by patch_size {patch_size}; "
            "resize the mask to the training image size first"
        )
    m = mask.to(torch.float32)
    # avg_pool2d with kernel == stride == p: exact per-patch mean, no overlap.
    return F.avg_pool2d(m[:, None], kernel_size=patch_size, stride=patch_size)[:, 0]  # [B, gh, gw]
