"""Masking strategies: which patches the model must reconstruct.

Every strategy has the same signature::

    fn(batch_size, grid, ratio, *, region=None, generator=None, device=None, **opts)
        -> torch.BoolTensor[batch_size, gh * gw]          # True = masked

and masks the *same number of patches in every sample*, so MAE-style encoders can
drop the masked tokens and still work on a rectangular batch.  All of them are
vectorised over the batch (one sort per call, no Python loop per image) and draw
every random number from ``generator``, so a seed reproduces a mask exactly.

Random numbers are drawn on the generator's device and the result is moved to
``device``: the same CPU generator gives the same mask whether the model runs on
the CPU or a GPU.  Making masks on the CPU (in the data loader or the training
loop) and moving them with the batch is the cheapest option: the models then
derive their gather indices without a host/device synchronisation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError

Grid = tuple[int, int]
Strategy = Callable[..., torch.Tensor]


class RegionFallbackWarning(UserWarning):
    """Region-guided masking met samples without any region and masked them at random."""


# --------------------------------------------------------------------- helpers
def _check_common(batch_size: int, grid: Grid, ratio: float) -> tuple[int, int, int]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ConfigError(f"grid must be (rows, cols) of patches, got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise ConfigError(f"grid must be positive, got {grid!r}")
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"mask ratio must be a number in [0, 1], got {ratio!r}") from None
    if not 0.0 <= r <= 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1], got {ratio!r}")
    return gh, gw, gh * gw


def _check_opts(name: str, opts: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for mask strategy {name!r} (valid: {valid})")


def _out_device(device: torch.device | str | None, region: torch.Tensor | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if region is not None:
        return region.device
    return torch.device("cpu")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) noise drawn on the generator's device (reproducible), then moved to ``device``."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src).to(device, non_blocking=True)


def _smallest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[B, L]`` marking the ``k`` smallest scores of each row (exactly ``k`` per row)."""
    B, L = score.shape
    mask = torch.zeros(B, L, dtype=torch.bool, device=score.device)
    if k <= 0:
        return mask
    if k >= L:
        return mask.fill_(True)
    ids = torch.topk(score, k, dim=1, largest=False, sorted=False).indices  # [B, k]
    return mask.scatter_(1, ids, True)


def _count(ratio: float, n: int) -> int:
    """Python's ``round`` (ties to even), as documented for every strategy."""
    return int(round(ratio * n))


# --------------------------------------------------------------------- random (MAE)
def random_mask(
    batch_size: int,
    grid: Grid,
    ratio: float,
    *,
    region: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    **opts: Any,
) -> torch.Tensor:
    """MAE masking: each sample hides ``round(gh*gw*ratio)`` patches chosen uniformly.

    Equivalent to MAE's per-sample ``argsort`` of uniform noise (the patches with
    the smallest noise are masked); ``region`` is ignored.
    """
    _check_opts("random", opts, ())
    gh, gw, L = _check_common(batch_size, grid, ratio)
    dev = _out_device(device, region)
    noise = _uniform((batch_size, L), generator, dev)  # [B, L]
    return _smallest_k(noise, _count(ratio, L))


# --------------------------------------------------------------------- block (SimMIM)
def block_mask(
    batch_size: int,
    grid: Grid,
    ratio: float,
    *,
    region: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    patch_size: int | None = None,
    mask_patch_size: int = 32,
    **opts: Any,
) -> torch.Tensor:
    """SimMIM masking: whole cells of ``mask_patch_size`` pixels, on the model's patch grid.

    The patch grid is cut into cells of ``s = mask_patch_size // patch_size`` patches
    a side; ``round(ratio * L / s²)`` cells' worth of patches (L = gh*gw) are masked
    in every sample, so when the grid divides by ``s`` exactly
    ``round(ratio * n_cells)`` whole cells are masked, as in SimMIM.

    When it does not divide, the last row/column of cells is partial.  Cells are
    then taken in random order until the patch budget is met and the last cell
    taken may be filled only in part (random patches of it): the masked-patch count
    stays identical across the batch (so the mask also suits MAE-style models) and
    the mask stays blocky everywhere else.
    """
    _check_opts("block", opts, ())
    gh, gw, L = _check_common(batch_size, grid, ratio)
    if patch_size is None:
        raise ConfigError("block masking needs the model's patch_size option (e.g. patch_size=16)")
    for name, value in (("patch_size", patch_size), ("mask_patch_size", mask_patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if mask_patch_size % patch_size:
        raise ConfigError(
            f"mask_patch_size {mask_patch_size} must be a multiple of the model patch_size {patch_size}"
        )
    s = mask_patch_size // patch_size
    dev = _out_device(device, region)
    ch, cw = -(-gh // s), -(-gw // s)  # cells per column / row (ceil)
    n_cells = ch * cw
    m = min(L, _count(ratio, L / (s * s)) * s * s)

    # Cell id of every patch, raster order.                                    [L]
    rows = torch.arange(gh, device=dev) // s
    cols = torch.arange(gw, device=dev) // s
    cell_of_patch = (rows[:, None] * cw + cols[None, :]).reshape(L)

    cell_noise = _uniform((batch_size, n_cells), generator, dev)            # [B, n_cells]
    patch_noise = _uniform((batch_size, L), generator, dev)                 # [B, L] tie-break
    order = torch.argsort(cell_noise, dim=1)                                # [B, n_cells]
    cell_rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n_cells, device=dev).expand(batch_size, -1)
    )                                                                       # [B, n_cells]
    # Integer cell rank dominates, the [0, 1) noise only orders patches inside a cell.
    score = cell_rank.gather(1, cell_of_patch.expand(batch_size, -1)).to(torch.float32) + patch_noise
    return _smallest_k(score, m)


# --------------------------------------------------------------------- region (RGMIM)
def region_mask(
    batch_size: int,
    grid: Grid,
    ratio: float,
    *,
    region: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_overlap: float = 0.0,
    ratio_of: str = "total",
    **opts: Any,
) -> torch.Tensor:
    """RGMIM masking: patches that overlap the region are masked first.

    A patch is *valid* when its region coverage is ``>= min_overlap`` (when
    ``min_overlap > 0``) or ``> 0`` (any overlap, the default).  Patches are ranked
    by ``rand + (not valid)``, so valid patches come first in random order and
    random invalid patches fill in when fewer than the budget are valid.

    Budget ``m`` (identical for every sample):
      * ``ratio_of="total"`` (default): ``round(gh*gw*ratio)``;
      * ``ratio_of="valid"``: ``round(ratio * min_b n_valid)`` (at least 1 when
        ``ratio > 0``), i.e. the ratio applies to the valid patches of the sample
        with the smallest region, so no sample needs to borrow invalid patches.

    A sample with an empty region is masked at random (its ranking is pure noise)
    and one :class:`RegionFallbackWarning` per call says how many samples that was;
    with ``ratio_of="valid"`` such samples count as all-valid for the budget.

    Returns a bool ``[B, gh*gw]`` mask (True = masked).  Raises ConfigError without a
    ``region`` of shape ``[B, gh, gw]`` (or ``[B, gh*gw]``), or for a ``min_overlap``
    outside [0, 1] or another ``ratio_of``.
    """
    _check_opts("region", opts, ())
    gh, gw, L = _check_common(batch_size, grid, ratio)
    min_overlap = _check_region(region, (batch_size, gh, gw), min_overlap, ratio_of)
    dev = _out_device(device, region)
    cov = region.reshape(batch_size, L).to(dev)                               # [B, L]
    valid = cov >= min_overlap if min_overlap > 0 else cov > 0                # [B, L]
    empty = _warn_empty_regions(valid)                                        # [B]
    m = _region_budget(valid, empty, ratio, ratio_of)
    noise = _uniform((batch_size, L), generator, dev)                        # [B, L]
    score = noise + (~valid).to(noise.dtype)                                  # valid in [0,1), invalid in [1,2)
    return _smallest_k(score, m)


def _check_region(region: torch.Tensor | None, shape: tuple[int, int, int], min_overlap: Any,
                  ratio_of: str) -> float:
    """``min_overlap`` as a float, after checking the region options; raises ConfigError."""
    batch_size, gh, gw = shape
    if region is None:
        raise ConfigError(
            "region masking needs region coverage [B, gh, gw] "
            "(make it with mim_workbench.masking.patch_coverage(mask, patch_size))"
        )
    if ratio_of not in ("total", "valid"):
        raise ConfigError(f"ratio_of must be 'total' or 'valid', got {ratio_of!r}")
    try:
        min_overlap = float(min_overlap)
    except (TypeError, ValueError):
        raise ConfigError(f"min_overlap must be a number in [0, 1], got {min_overlap!r}") from None
    if not 0.0 <= min_overlap <= 1.0:
        raise ConfigError(f"min_overlap must be in [0, 1], got {min_overlap!r}")
    if tuple(region.shape) not in ((batch_size, gh, gw), (batch_size, gh * gw)):
        raise ConfigError(
            f"region coverage must have shape [{batch_size}, {gh}, {gw}], got {tuple(region.shape)}"
        )
    return min_overlap


def _warn_empty_regions(valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` True for samples without a valid patch; one warning names how many there were."""
    empty = valid.sum(dim=1) == 0                                             # [B]
    n_empty = int(empty.sum())
    if n_empty:
        warnings.warn(
            f"region-guided masking: {n_empty} of {valid.shape[0]} sample(s) have an empty region "
            "and were masked at random",
            RegionFallbackWarning,
            stacklevel=4,  # past this helper, region_mask and make_mask: the line that asked for the mask
        )
    return empty


def _region_budget(valid: torch.Tensor, empty: torch.Tensor, ratio: float, ratio_of: str) -> int:
    """Patches to mask in every sample (see :func:`region_mask`)."""
    L = valid.shape[1]
    if ratio_of == "total":
        return _count(ratio, L)
    n_valid = valid.sum(dim=1)                                                # [B]
    n_eff = torch.where(empty, torch.full_like(n_valid, L), n_valid)          # [B]
    m = _count(ratio, int(n_eff.min()))
    return max(m, 1) if ratio > 0 else m


# --------------------------------------------------------------------- blockwise (BEiT)
def blockwise_mask(
    batch_size: int,
    grid: Grid,
    ratio: float,
    *,
    region: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_block: int | None = None,
    attempts: int = 10,
    **opts: Any,
) -> torch.Tensor:
    """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1) at ``round(gh*gw*ratio)`` patches.

    Rectangles of random area (at least ``min_block`` patches; default BEiT's 16 of 196,
    scaled to this grid) and log-uniform aspect ratio in [0.3, 1/0.3] are added while
    they do not overshoot the budget.  BEiT stops short of the budget when its attempts
    fail; here the few patches still missing are then masked at random, so that every
    sample hides the same number of patches (all our models need a rectangular batch).
    The rectangles are drawn for the whole batch at once (a loop over attempts, not
    over images); ``region`` is ignored.
    """
    _check_opts("blockwise", opts, ())
    gh, gw, L = _check_common(batch_size, grid, ratio)
    dev = _out_device(device, region)
    m = _count(ratio, L)
    low = max(1, round(16 * L / 196)) if min_block is None else int(min_block)
    log_ar = torch.tensor([math.log(0.3), math.log(1 / 0.3)])
    rows = torch.arange(gh, device=dev)[None, :, None]                                  # [1, gh, 1]
    cols = torch.arange(gw, device=dev)[None, None, :]                                  # [1, 1, gw]
    mask = torch.zeros(batch_size, gh, gw, dtype=torch.bool, device=dev)
    count = torch.zeros(batch_size, dtype=torch.long, device=dev)
    for _ in range(attempts * max(1, -(-m // low))):
        left_over = (m - count).clamp(min=0)                                            # [B]
        if not bool(left_over.any()):
            break
        u = _uniform((batch_size, 4), generator, dev)                                   # [B, 4]
        area = low + u[:, 0] * (left_over.clamp(min=low) - low)
        aspect = torch.exp(log_ar[0] + u[:, 1] * (log_ar[1] - log_ar[0])).to(dev)
        h = torch.round(torch.sqrt(area * aspect)).long().clamp(min=1)
        w = torch.round(torch.sqrt(area / aspect)).long().clamp(min=1)
        fits = (h < gh) & (w < gw) if min(gh, gw) > 1 else (h <= gh) & (w <= gw)
        top = (u[:, 2] * (gh - h + 1).clamp(min=1)).long()
        lft = (u[:, 3] * (gw - w + 1).clamp(min=1)).long()
        rect = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                & (cols >= lft[:, None, None]) & (cols < (lft + w)[:, None, None]))      # [B, gh, gw]
        new = (rect & ~mask).flatten(1).sum(1)                                          # [B]
        take = fits & (new > 0) & (new <= left_over)
        mask |= rect & take[:, None, None]
        count += new * take
    # masked patches first, then random others to fill the budget exactly
    score = (~mask).flatten(1).float() + _uniform((batch_size, L), generator, dev)
    return _smallest_k(score, m)


# --------------------------------------------------------------------- registry
STRATEGIES: dict[str, Strategy] = {
    "random": random_mask,
    "block": block_mask,
    "blockwise": blockwise_mask,
    "region": region_mask,
}


def make_mask(
    strategy: str,
    batch_size: int,
    grid: Grid,
    ratio: float,
    *,
    region: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    **opts: Any,
) -> torch.Tensor:
    """Look ``strategy`` up in :data:`STRATEGIES` and call it; unknown names raise ConfigError."""
    try:
        fn = STRATEGIES[strategy]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown mask strategy {strategy!r} (valid: {', '.join(sorted(STRATEGIES))})"
        ) from None
    return fn(batch_size, grid, ratio, region=region, generator=generator, device=device, **opts)
