"""Invariants of the masking strategies (hypothesis) and of their helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mim_workbench.errors import ConfigError
from mim_workbench.masking import (
    STRATEGIES,
    RegionFallbackWarning,
    check_equal_counts,
    make_mask,
    mask_to_indices,
    patch_coverage,
)

FAST = settings(max_examples=40, deadline=None)

grids = st.tuples(st.integers(1, 9), st.integers(1, 9))
ratios = st.floats(0.0, 1.0, allow_nan=False)
batches = st.integers(1, 6)
seeds = st.integers(0, 2**31 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coverage_for(seed: int, b: int, grid: tuple[int, int], p_any: float = 0.3) -> torch.Tensor:
    """Random per-patch coverage: some zeros, some partial, some full."""
    g = gen(seed + 1)
    cov = torch.rand(b, *grid, generator=g)
    keep = torch.rand(b, *grid, generator=g) < p_any
    return torch.where(keep, cov, torch.zeros_like(cov))


def opts_for(name: str) -> dict:
    return {"patch_size": 16} if name == "block" else {}


# --------------------------------------------------------------------- every strategy
@FAST
@given(name=st.sampled_from(sorted(STRATEGIES)), b=batches, grid=grids, ratio=ratios, seed=seeds)
def test_shape_dtype_equal_counts_and_determinism(name, b, grid, ratio, seed):
    region = coverage_for(seed, b, grid, p_any=1.0)  # non-empty almost surely; warnings tested below
    region[:, 0, 0] = 1.0
    m1 = make_mask(name, b, grid, ratio, region=region, generator=gen(seed), **opts_for(name))
    m2 = make_mask(name, b, grid, ratio, region=region, generator=gen(seed), **opts_for(name))
    L = grid[0] * grid[1]
    assert m1.shape == (b, L) and m1.dtype == torch.bool and m1.device.type == "cpu"
    counts = m1.sum(1)
    assert bool((counts == counts[0]).all())
    assert torch.equal(m1, m2)


@FAST
@given(b=batches, grid=grids, ratio=ratios, seed=seeds)
def test_random_exact_count(b, grid, ratio, seed):
    L = grid[0] * grid[1]
    m = make_mask("random", b, grid, ratio, generator=gen(seed))
    assert m.sum(1).tolist() == [round(L * ratio)] * b


def test_different_seeds_differ_and_samples_differ():
    a = make_mask("random", 4, (14, 14), 0.75, generator=gen(0))
    b = make_mask("random", 4, (14, 14), 0.75, generator=gen(1))
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # per-sample noise, not one mask for the batch


def test_device_argument_and_generator_device_independence():
    region = torch.ones(2, 4, 4)
    for name in STRATEGIES:
        m = make_mask(name, 2, (4, 4), 0.5, region=region, generator=gen(3), device="cpu", **opts_for(name))
        assert m.device.type == "cpu"
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        m_cpu = make_mask("random", 2, (4, 4), 0.5, generator=gen(3))
        m_gpu = make_mask("random", 2, (4, 4), 0.5, generator=gen(3), device="cuda")
        assert m_gpu.device.type == "cuda" and torch.equal(m_cpu, m_gpu.cpu())


# --------------------------------------------------------------------- region
@FAST
@given(b=batches, grid=grids, ratio=ratios, seed=seeds, min_overlap=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_region_valid_first(b, grid, ratio, seed, min_overlap):
    L = grid[0] * grid[1]
    cov = coverage_for(seed, b, grid)
    cov[:, 0, 0] = 1.0  # every sample has a valid patch: no fallback
    m = make_mask("region", b, grid, ratio, region=cov, generator=gen(seed), min_overlap=min_overlap)
    valid = (cov >= min_overlap if min_overlap > 0 else cov > 0).reshape(b, L)
    k = round(L * ratio)
    assert m.sum(1).tolist() == [k] * b
    n_valid = valid.sum(1)
    masked_valid = (m & valid).sum(1)
    # Valid patches are used up first: either all masked patches are valid, or all valid are masked.
    assert bool((masked_valid == torch.minimum(n_valid, torch.full_like(n_valid, k))).all())


@FAST
@given(b=batches, grid=grids, ratio=ratios, seed=seeds)
def test_region_ratio_of_valid(b, grid, ratio, seed):
    L = grid[0] * grid[1]
    cov = coverage_for(seed, b, grid)
    cov[:, 0, 0] = 1.0
    valid = (cov > 0).reshape(b, L)
    m = make_mask("region", b, grid, ratio, region=cov, generator=gen(seed), ratio_of="valid")
    expected = round(ratio * int(valid.sum(1).min()))
    if ratio > 0:
        expected = max(expected, 1)
    assert m.sum(1).tolist() == [expected] * b
    assert bool((m & ~valid).sum() == 0)  # never borrows invalid patches


def test_region_empty_sample_falls_back_to_random_with_one_warning():
    cov = torch.zeros(3, 6, 6)
    cov[0, 2:4, 2:4] = 1.0
    with pytest.warns(RegionFallbackWarning, match="2 of 3") as rec:
        m = make_mask("region", 3, (6, 6), 0.5, region=cov, generator=gen(0))
    assert len(rec) == 1
    assert m.sum(1).tolist() == [18, 18, 18]
    assert bool(m[0].view(6, 6)[2:4, 2:4].all())  # the non-empty sample masks its region first
    # The empty samples are masked exactly as the random strategy ranks pure noise: spread out,
    # not concentrated on any fixed location.
    assert not torch.equal(m[1], m[2])


def test_region_all_empty_ratio_of_valid_behaves_as_random():
    cov = torch.zeros(2, 4, 4)
    with pytest.warns(RegionFallbackWarning):
        m = make_mask("region", 2, (4, 4), 0.75, region=cov, generator=gen(0), ratio_of="valid")
    assert m.sum(1).tolist() == [12, 12]


def test_region_no_warning_when_all_have_regions():
    cov = torch.ones(2, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_mask("region", 2, (4, 4), 0.5, region=cov, generator=gen(0))


def test_region_accepts_flat_coverage_and_checks_shape():
    cov = torch.ones(2, 12)
    assert make_mask("region", 2, (3, 4), 0.5, region=cov, generator=gen(0)).shape == (2, 12)
    with pytest.raises(ConfigError, match=r"\[2, 3, 4\]"):
        make_mask("region", 2, (3, 4), 0.5, region=torch.ones(2, 4, 3))
    with pytest.raises(ConfigError, match="patch_coverage"):
        make_mask("region", 2, (3, 4), 0.5)
    with pytest.raises(ConfigError, match="ratio_of"):
        make_mask("region", 2, (3, 4), 0.5, region=cov, ratio_of="organ")


# --------------------------------------------------------------------- block
@FAST
@given(b=batches, gh=st.integers(1, 15), gw=st.integers(1, 15), ratio=ratios, seed=seeds,
       cell=st.sampled_from([16, 32, 48, 64]))
def test_block_counts(b, gh, gw, ratio, seed, cell):
    s = cell // 16
    m = make_mask("block", b, (gh, gw), ratio, generator=gen(seed), patch_size=16, mask_patch_size=cell)
    L = gh * gw
    expected = min(L, round(ratio * L / (s * s)) * s * s)
    assert m.sum(1).tolist() == [expected] * b


@FAST
@given(b=batches, ch=st.integers(1, 5), cw=st.integers(1, 5), ratio=ratios, seed=seeds)
def test_block_whole_cells_on_divisible_grids(b, ch, cw, ratio, seed):
    """With a grid divisible by the cell, exactly round(ratio * n_cells) whole cells are masked."""
    s = 2
    m = make_mask("block", b, (ch * s, cw * s), ratio, generator=gen(seed), patch_size=16, mask_patch_size=32)
    cells = m.view(b, ch, s, cw, s).permute(0, 1, 3, 2, 4).reshape(b, ch * cw, s * s)
    per_cell = cells.sum(-1)
    assert bool(((per_cell == 0) | (per_cell == s * s)).all())  # cells are all-or-nothing
    assert (per_cell == s * s).sum(1).tolist() == [round(ratio * ch * cw)] * b


def test_block_options_checked():
    with pytest.raises(ConfigError, match="patch_size"):
        make_mask("block", 1, (4, 4), 0.5)
    with pytest.raises(ConfigError, match="multiple"):
        make_mask("block", 1, (4, 4), 0.5, patch_size=16, mask_patch_size=24)


# --------------------------------------------------------------------- registry / errors
def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ConfigError, match="block, blockwise, random, region"):
        make_mask("checkerboard", 1, (2, 2), 0.5)


def test_unknown_option_and_bad_ratio():
    with pytest.raises(ConfigError, match="min_overlap"):
        make_mask("random", 1, (2, 2), 0.5, min_overlap=0.5)
    with pytest.raises(ConfigError, match="1.5"):
        make_mask("random", 1, (2, 2), 1.5)


# --------------------------------------------------------------------- helpers
def test_patch_coverage_values():
    mask = torch.zeros(2, 8, 12)
    mask[0, :4, :4] = 1          # patch (0, 0) fully covered
    mask[0, 4:6, 4:8] = 1        # patch (1, 1): 8 of 16 pixels
    mask[1, 0, 0] = 1            # one pixel of patch (0, 0)
    cov = patch_coverage(mask, 4)
    assert cov.shape == (2, 2, 3) and cov.dtype == torch.float32
    assert cov[0, 0, 0] == 1.0 and cov[0, 1, 1] == 0.5 and cov[1, 0, 0] == 1 / 16
    assert float(cov.sum()) == pytest.approx(1.5 + 1 / 16)
    assert torch.equal(patch_coverage(mask.bool(), 4), cov)
    assert patch_coverage(mask[0], 4).shape == (1, 2, 3)
    with pytest.raises(ConfigError, match="not divisible"):
        patch_coverage(mask, 5)


def test_coverage_feeds_region_strategy():
    mask = torch.zeros(1, 64, 96)
    mask[0, 16:48, 32:64] = 1
    cov = patch_coverage(mask, 16)  # [1, 4, 6]
    m = make_mask("region", 1, (4, 6), 4 / 24, region=cov, generator=gen(0))
    assert bool(m.view(4, 6)[1:3, 2:4].all()) and int(m.sum()) == 4


def test_mask_to_indices():
    m = make_mask("random", 3, (4, 5), 0.6, generator=gen(0))
    idx = mask_to_indices(m)
    assert idx.n_masked == 12 and idx.n_visible == 8
    assert idx.ids_keep.shape == (3, 8) and idx.ids_masked.shape == (3, 12)
    for b in range(3):
        assert idx.ids_masked[b].tolist() == torch.nonzero(m[b]).flatten().tolist()
        assert idx.ids_keep[b].tolist() == torch.nonzero(~m[b]).flatten().tolist()
    shuffled = torch.cat([idx.ids_keep, idx.ids_masked], 1)
    assert torch.equal(shuffled.gather(1, idx.ids_restore), torch.arange(20).expand(3, -1))


def test_unequal_counts_rejected():
    m = torch.zeros(2, 4, dtype=torch.bool)
    m[0, 0] = True
    with pytest.raises(ConfigError, match="different number"):
        check_equal_counts(m)
    with pytest.raises(ConfigError, match="bool"):
        mask_to_indices(m.int())
