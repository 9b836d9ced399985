"""Region masks (value rule, resampling, aspect check) and letterboxing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_io import ramp, write_png

from mim_workbench.errors import ReaderError
from mim_workbench.io import Letterbox, letterbox, read_mask
from mim_workbench.io.masks import binarize


def _disc(shape: tuple[int, int], value: int = 255) -> np.ndarray:
    h, w = shape
    rr, cc = np.mgrid[:h, :w]
    return (((rr - h / 2) ** 2 + (cc - w / 2) ** 2) < (min(h, w) / 3) ** 2).astype(np.uint8) * value


# --------------------------------------------------------------------------- value rule

def test_v7_scheme_255_is_region_127_is_ignored() -> None:
    m = np.array([[0, 127, 255], [255, 127, 0]], np.uint8)
    np.testing.assert_array_equal(binarize(m), [[0, 0, 1], [1, 0, 0]])


def test_label_images_nonzero_is_region() -> None:
    levels = np.array([[0, 102, 153, 255]], np.uint8)
    np.testing.assert_array_equal(binarize(levels), [[0, 1, 1, 1]])
    ids = np.array([[0, 1, 2, 3]], np.uint16)
    np.testing.assert_array_equal(binarize(ids), [[0, 1, 1, 1]])
    np.testing.assert_array_equal(binarize(np.array([[0, 1]], np.uint8)), [[0, 1]])
    np.testing.assert_array_equal(binarize(np.array([[False, True]])), [[0, 1]])


def test_many_values_threshold_at_half_range() -> None:
    noisy = np.arange(256, dtype=np.uint8).reshape(16, 16)  # e.g. a JPEG-compressed mask
    out = binarize(noisy)
    assert out.sum() == 128 and out.ravel()[128] == 1 and out.ravel()[127] == 0
    f = np.linspace(0, 1, 100).reshape(10, 10)
    assert binarize(f).sum() == 50


def test_colour_mask_uses_max_channel(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:4, 2:4, 0] = 255
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "c.png", rgb)), (rgb[..., 0] > 0).astype(np.uint8))


# --------------------------------------------------------------------------- formats and resampling

def test_mask_formats_agree(tmp_path: Path) -> None:
    import tifffile
    import zarr

    m = _disc((32, 40))
    write_png(tmp_path / "m.png", m)
    tifffile.imwrite(tmp_path / "m.tif", m)
    np.save(tmp_path / "m.npy", m > 0)
    z = zarr.create_array(str(tmp_path / "m.zarr"), shape=m.shape, dtype=m.dtype)
    z[...] = m
    expected = (m > 0).astype(np.uint8)
    for name in ("m.png", "m.tif", "m.npy", "m.zarr"):
        out = read_mask(tmp_path / name)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected, err_msg=name)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", shape=(32, 40)), expected)


def test_resample_256_to_299_nearest(tmp_path: Path) -> None:
    m = _disc((256, 256))
    m[100:110, 100:110] = 127  # V7 "ignore" stays background after resampling
    out = read_mask(write_png(tmp_path / "m.png", m), shape=(299, 299))
    assert out.shape == (299, 299) and set(np.unique(out)) == {0, 1}
    assert abs(out.mean() - (m == 255).mean()) < 0.01
    assert out[int(105 * 299 / 256), int(105 * 299 / 256)] == 0


def test_aspect_mismatch_names_both_shapes(tmp_path: Path) -> None:
    path = write_png(tmp_path / "m.png", _disc((256, 256)))
    with pytest.raises(ReaderError, match=r"m\.png.*\(256, 256\).*\(299, 400\)"):
        read_mask(path, shape=(299, 400))
    assert read_mask(path, shape=(300, 303)).shape == (300, 303)  # within 2 %


def test_mask_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ReaderError, match=r"\(2, 8, 8\)"):
        read_mask(tmp_path / "v.npy")
    (tmp_path / "t.png").write_text("no")
    with pytest.raises(ReaderError, match="not a PNG"):
        read_mask(tmp_path / "t.png")


# --------------------------------------------------------------------------- letterbox

def test_letterbox_keeps_aspect_and_pads_bottom_right() -> None:
    img = ramp((100, 200), np.float32)
    out, box = letterbox(img, (64, 64))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert box == Letterbox(source_shape=(100, 200), size=(64, 64), content_shape=(32, 64))
    assert box.offset == (0, 0)
    assert np.all(out[32:] == 0) and out[:32].max() > 0.9
    assert box.scale == (0.32, 0.32)
    back = box.restore(out)
    assert back.shape == (100, 200) and np.abs(back - img).mean() < 0.02
    r, c = box.to_source(*box.to_canvas(np.array([10.0]), np.array([150.0])))
    np.testing.assert_allclose([r[0], c[0]], [10.0, 150.0])


def test_letterbox_non_square_and_upscale_and_colour() -> None:
    out, box = letterbox(ramp((50, 50), np.float32), (192, 256))
    assert out.shape == (192, 256) and box.content_shape == (192, 192)
    assert np.all(out[:, 192:] == 0)
    rgb = np.dstack([ramp((40, 80), np.float32)] * 3)
    out, box = letterbox(rgb, (32, 32))
    assert out.shape == (32, 32, 3) and box.content_shape == (16, 32)


def test_letterbox_mask_nearest_keeps_values() -> None:
    m = _disc((299, 299), 1)
    out, box = letterbox(m, (224, 224), order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    assert abs(out.mean() - m.mean()) < 0.01


def test_letterbox_dask_input_matches_numpy() -> None:
    import dask.array as da

    img = ramp((400, 300), np.float32)
    a, box_a = letterbox(img, (64, 64))
    b, box_b = letterbox(da.from_array(img, chunks=128), (64, 64))
    assert box_a == box_b
    assert np.abs(a - b).max() < 0.02


# --------------------------------------------------------------------------- saving

def test_save_mask_round_trip(tmp_path: Path) -> None:
    from mim_workbench.io.mask_writer import save_mask

    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 3:9] = 1
    labels[10:15, 10:20] = 3
    for name in ("m.png", "m.tif", "m.npy"):
        out = save_mask(tmp_path / "sub" / name, labels)
        assert out == tmp_path / "sub" / name
        np.testing.assert_array_equal(read_mask(out), (labels > 0).astype(np.uint8), err_msg=name)
    assert np.array_equal(np.load(tmp_path / "sub" / "m.npy"), labels)  # labels kept
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.npy", "m.png", "m.tif"]  # no temp files
    with pytest.raises(ReaderError, match="jpg"):
        save_mask(tmp_path / "m.jpg", labels)
    with pytest.raises(ReaderError, match="2-D"):
        save_mask(tmp_path / "m.png", np.zeros((2, 3, 4)))
