"""Masking strategies for masked image modeling (MAE random, SimMIM block, RGMIM region).

All strategies share one signature and return ``BoolTensor[B, gh*gw]`` (True = masked)
with the same number of masked patches in every sample; see :mod:`.strategies`.
"""

from .coverage import patch_coverage
from .indices import MaskIndices, check_equal_counts, mask_to_indices
from .strategies import (
    STRATEGIES,
    RegionFallbackWarning,
    block_mask,
    make_mask,
    random_mask,
    region_mask,
)

__all__ = [
    "STRATEGIES",
    "MaskIndices",
    "RegionFallbackWarning",
    "block_mask",
    "check_equal_counts",
    "make_mask",
    "mask_to_indices",
    "patch_coverage",
    "random_mask",
    "region_mask",
]
