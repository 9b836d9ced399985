import numpy as np
import pytest

from mim_workbench.masking.preview import preview_mask


@pytest.mark.parametrize("strategy", ["random", "block", "region"])
def test_preview_masks_the_ratio_on_the_image_grid(strategy):
    region = np.zeros((300, 400), np.uint8)
    region[40:260, 60:220] = 1
    m = preview_mask((300, 400), strategy=strategy, ratio=0.5, region=region, seed=3)
    assert m.shape == (300, 400) and m.dtype == bool
    assert 0.4 < m.mean() < 0.6
    assert np.array_equal(m, preview_mask((300, 400), strategy=strategy, ratio=0.5, region=region, seed=3))


def test_region_preview_puts_masked_patches_on_the_region_first():
    region = np.zeros((300, 400), np.uint8)
    region[40:260, 60:220] = 1
    m = preview_mask((300, 400), strategy="region", ratio=0.2, region=region, seed=0)
    # 20 % of patches fit among the cells touching the ~30 % region (boundary cells are only
    # partly inside, so not every masked pixel is region)
    assert region[m].mean() > 2 * region.mean()


def test_empty_region_falls_back_to_random_without_error():
    m = preview_mask((128, 128), strategy="region", ratio=0.75, region=np.zeros((128, 128)), seed=0)
    assert 0.7 < m.mean() < 0.8
