"""Gather indices for models that drop masked tokens (MAE, RGMIM, MIRAM).

The encoder of MAE sees only visible tokens, so every sample must keep the same
number of tokens for the batch to stay a rectangular tensor.  The strategies in
this package guarantee that; this module turns their boolean mask into the
indices the model gathers with, and refuses a mask that breaks the invariant with
a message instead of a shape error deep inside attention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError


class MaskIndices(NamedTuple):
    """Indices derived from a bool mask ``[B, L]`` with equal counts per row.

    All index tensors are int64 on the mask's device; within each group the
    patch ids are in increasing (raster) order.
    """

    ids_keep: torch.Tensor     # [B, V] visible patch ids
    ids_masked: torch.Tensor   # [B, M] masked patch ids
    ids_restore: torch.Tensor  # [B, L] position of each patch in cat(keep, masked)
    n_visible: int             # V
    n_masked: int              # M


def mask_counts(mask: torch.Tensor) -> torch.Tensor:
    """Number of masked patches per sample, int64 ``[B]``."""
    return mask.sum(dim=1)


def check_equal_counts(mask: torch.Tensor) -> int:
    """Return the masked count shared by every row of ``mask``; raise if rows differ.

    On a CUDA mask this synchronises once; masks made on the CPU (the
    recommended way, from a CPU ``torch.Generator``) cost nothing.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ConfigError(f"mask must be a bool tensor [B, L], got {mask.dtype} {tuple(mask.shape)}")
    counts = mask_counts(mask)  # [B]
    lo, hi = int(counts.min()), int(counts.max())
    if lo != hi:
        raise ConfigError(
            f"mask hides a different number of patches per sample (from {lo} to {hi}); "
            "MAE-style models need the same count in every sample - use a strategy from "
            "mim_workbench.masking (they all keep the count fixed)"
        )
    return lo


def mask_to_indices(mask: torch.Tensor) -> MaskIndices:
    """Keep/masked/restore indices for a bool mask ``[B, L]`` (True = masked).

    A stable argsort of the mask as integers puts the visible patches (0) first and
    the masked ones (1) after, each in raster order, in one vectorised call.
    """
    n_masked = check_equal_counts(mask)
    L = mask.shape[1]
    n_visible = L - n_masked
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # [B, L]: visible, then masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)                        # [B, L]
    return MaskIndices(
        ids_keep=ids_shuffle[:, :n_visible],
        ids_masked=ids_shuffle[:, n_visible:],
        ids_restore=ids_restore,
        n_visible=n_visible,
        n_masked=n_masked,
    )
