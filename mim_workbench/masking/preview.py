"""Which pixels of a full-size image a strategy would mask during training.

Training letterboxes each image to ``img_size`` (aspect kept, padded), so one model
patch covers ``patch_size × longest_side / img_size`` source pixels. The preview uses
that geometry, the same strategy code and the same coverage rule as training, then maps
the patch mask back onto the image grid.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .strategies import make_mask


def preview_mask(shape: tuple[int, int], *, strategy: str, ratio: float, patch_size: int = 16,
                 img_size: int = 224, region: np.ndarray | None = None, seed: int = 0,
                 **opts) -> np.ndarray:
    """Boolean ``shape`` array, True where the chosen strategy masks (one draw from ``seed``)."""
    h, w = int(shape[0]), int(shape[1])
    cell = max(1.0, patch_size * max(h, w) / img_size)   # source pixels per model patch
    gh, gw = max(1, math.ceil(h / cell)), max(1, math.ceil(w / cell))
    cov = torch.zeros(1, gh, gw)  # no region yet (nothing painted): region masking falls back to random
    if region is not None:
        reg = np.asarray(region)[:h, :w] > 0
        rows = np.minimum((np.arange(h) / cell).astype(int), gh - 1)
        cols = np.minimum((np.arange(w) / cell).astype(int), gw - 1)
        sums = np.zeros((gh, gw), np.float64)
        np.add.at(sums, (rows[:, None], cols[None, :]), reg)
        counts = np.zeros((gh, gw), np.float64)
        np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
        cov = torch.from_numpy((sums / np.maximum(counts, 1)).astype(np.float32))[None]
    if strategy == "block":
        opts.setdefault("patch_size", patch_size)
    gen = torch.Generator().manual_seed(int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty region falls back to random: expected while painting
        mask = make_mask(strategy, 1, (gh, gw), float(ratio), region=cov if strategy == "region" else None,
                         generator=gen, **opts)
    grid = mask.reshape(gh, gw).numpy()
    rows = np.minimum((np.arange(h) / cell).astype(int), gh - 1)
    cols = np.minimum((np.arange(w) / cell).astype(int), gw - 1)
    return grid[rows[:, None], cols[None, :]]
