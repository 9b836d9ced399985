"""The data pipeline's fast paths give the plain path's values (to tolerance); never timed.

``crop_resize`` does its axis-aligned crop + resize with separable index gathers; the
plain path is ``skimage.transform.warp`` with the same affine map (the implementation
it replaced), which must agree: bilinear to float32 rounding, nearest exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from mim_workbench.training.augment import crop_resize, jitter, sample_params


def _warp_reference(canvas: np.ndarray, content_shape: tuple[int, int], p, *, order: int) -> np.ndarray:
    from skimage.transform import warp

    ch, cw = content_shape
    content = canvas[:ch, :cw]
    sy, sx = p.height, p.width
    matrix = np.array([[sx, 0.0, p.left * cw + 0.5 * sx - 0.5], [0.0, sy, p.top * ch + 0.5 * sy - 0.5],
                       [0.0, 0.0, 1.0]])
    src = content.astype(np.float32) if order > 0 else content
    out = warp(src, matrix, output_shape=content.shape, order=order, mode="edge", preserve_range=True)
    result = np.zeros_like(canvas)
    result[:ch, :cw] = out.astype(canvas.dtype) if order == 0 else out.astype(np.float32)
    return result


@pytest.mark.parametrize("shape,content", [((224, 224), (224, 204)), ((48, 64), (30, 64)), ((96, 128, 3), (96, 100))])
def test_crop_resize_matches_skimage_warp(shape, content):
    rng = np.random.default_rng(0)
    image = np.zeros(shape, np.float32)
    image[:content[0], :content[1]] = rng.random((content[0], content[1], *shape[2:]), dtype=np.float32)
    mask = np.zeros(shape[:2], np.uint8)
    mask[:content[0], :content[1]] = rng.random(content) > 0.5
    for i in range(40):
        p = sample_params(np.random.default_rng([0, 1, i]))
        fast = crop_resize(image, content, p, order=1)
        ref = _warp_reference(image, content, p, order=1)
        assert fast.dtype == ref.dtype == np.float32 and fast.shape == ref.shape
        np.testing.assert_allclose(fast, ref, rtol=0, atol=2e-4)
        assert not fast[content[0]:].any() and not fast[:, content[1]:].any()   # padding stays zero
        fast0 = crop_resize(mask, content, p, order=0)
        ref0 = _warp_reference(mask, content, p, order=0)
        assert fast0.dtype == np.uint8
        assert (fast0 != ref0).mean() <= 1e-3           # exact but for coordinates that tie at .5
        j = jitter(fast, content, p)
        np.testing.assert_allclose(j, jitter(ref, content, p), rtol=0, atol=3e-4)


def test_crop_resize_identity_box_is_identity():
    from mim_workbench.training.augment import AugmentParams

    rng = np.random.default_rng(2)
    image = rng.random((32, 40), dtype=np.float32)
    p = AugmentParams(top=0.0, left=0.0, height=1.0, width=1.0, contrast=1.0, brightness=0.0)
    np.testing.assert_allclose(crop_resize(image, (32, 40), p, order=1), image, atol=1e-6)
    mask = (rng.random((32, 40)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(crop_resize(mask, (32, 40), p, order=0), mask)
