"""Readers on generated files: every format, the [0, 1] rules, colour, laziness, DICOM tags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_io import ramp, write_dicom, write_png, write_sr

from mim_workbench.errors import ReaderError
from mim_workbench.io import LoadedImage, is_supported, read_image, read_path
from mim_workbench.io import meta as io_meta


def _check_image(img: LoadedImage, shape: tuple[int, ...]) -> None:
    data = np.asarray(img.data)
    assert data.dtype == np.float32
    assert data.shape == shape == img.meta.shape
    assert data.min() >= 0.0 and data.max() <= 1.0
    json.dumps(img.meta.to_dict())  # JSON-serialisable


# --------------------------------------------------------------------------- PNG / JPEG / TIFF

def test_png_8bit_divides_by_255(tmp_path: Path) -> None:
    raw = ramp((40, 60))
    img = read_image(write_png(tmp_path / "a.png", raw))
    _check_image(img, (40, 60))
    np.testing.assert_allclose(img.data, raw / 255.0, atol=1e-6)
    assert img.meta.window_source == "dtype_range"
    assert img.meta.original_dtype == "uint8"
    assert img.scale == (1.0, 1.0) and img.lazy is False


def test_png_16bit_full_range_uses_dtype_range(tmp_path: Path) -> None:
    raw = ramp((30, 50), np.uint16)
    img = read_image(write_png(tmp_path / "a16.png", raw))
    _check_image(img, (30, 50))
    np.testing.assert_allclose(img.data, raw / 65535.0, atol=1e-6)
    assert img.meta.window_source == "dtype_range"
    assert img.meta.original_dtype == "uint16"


def test_png_16bit_with_12_bits_used_is_min_max(tmp_path: Path) -> None:
    raw = ramp((30, 50), np.uint16, top=4095) + 100
    img = read_image(write_png(tmp_path / "a12.png", raw))
    assert img.meta.window_source == "minmax"
    assert img.data.min() == 0.0 and img.data.max() == 1.0
    assert any("bits" in n for n in img.meta.notes)


def test_rgb_png_becomes_grey_with_note_and_keep_color(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = ramp((20, 30))
    path = write_png(tmp_path / "rgb.png", rgb)
    grey = read_image(path)
    _check_image(grey, (20, 30))
    assert grey.meta.color is False and grey.meta.photometric == "RGB"
    assert any("grey" in n for n in grey.meta.notes)
    expected = (0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2]).round() / 255
    np.testing.assert_allclose(grey.data, expected, atol=1e-6)
    color = read_image(path, keep_color=True)
    _check_image(color, (20, 30, 3))
    assert color.meta.color is True
    np.testing.assert_allclose(color.data, rgb / 255.0, atol=1e-6)


def test_rgba_and_identical_channels(tmp_path: Path) -> None:
    g = ramp((16, 16))
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    img = read_image(write_png(tmp_path / "rgba.png", rgba))
    np.testing.assert_allclose(img.data, g / 255.0, atol=1e-6)
    assert any("identical" in n and "alpha" in n for n in img.meta.notes)
    kept = read_image(tmp_path / "rgba.png", keep_color=True)
    assert kept.data.shape == (16, 16, 3)


def test_jpeg_and_mislabeled_extension(tmp_path: Path) -> None:
    from PIL import Image

    raw = ramp((32, 48))
    Image.fromarray(raw).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    _check_image(img, (32, 48))
    assert np.corrcoef(img.data.ravel(), raw.ravel())[0, 1] > 0.99
    (tmp_path / "actually_jpeg.png").write_bytes((tmp_path / "a.jpg").read_bytes())
    img2 = read_image(tmp_path / "actually_jpeg.png")
    assert any("JPEG" in n for n in img2.meta.notes)


def test_tiff_16bit_and_miniswhite(tmp_path: Path) -> None:
    import tifffile

    raw = ramp((40, 30), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", raw)
    img = read_image(tmp_path / "a.tif")
    _check_image(img, (40, 30))
    np.testing.assert_allclose(img.data, raw / 65535.0, atol=1e-6)
    tifffile.imwrite(tmp_path / "w.tiff", raw, photometric="miniswhite")
    inv = read_image(tmp_path / "w.tiff")
    np.testing.assert_allclose(inv.data, 1.0 - raw / 65535.0, atol=1e-6)
    assert inv.meta.photometric == "MONOCHROME1"


def test_tiff_stack_is_refused(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(ReaderError, match=r"stack\.tif.*\(3, 16, 16\)"):
        read_image(tmp_path / "stack.tif")


def test_planar_rgb_tiff_is_channel_last(tmp_path: Path) -> None:
    import tifffile

    rgb = np.stack([ramp((16, 20)), np.zeros((16, 20), np.uint8), np.full((16, 20), 255, np.uint8)])
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    img = read_image(tmp_path / "planar.tif", keep_color=True)
    assert img.data.shape == (16, 20, 3)
    np.testing.assert_allclose(img.data[..., 2], 1.0)


def test_npy_float_and_int(tmp_path: Path) -> None:
    f = ramp((10, 12), np.float32)
    np.save(tmp_path / "f.npy", f)
    img = read_image(tmp_path / "f.npy")
    np.testing.assert_allclose(img.data, f)
    assert img.meta.window_source == "dtype_range"
    i16 = (ramp((10, 12), np.float64) * 2000 - 1000).astype(np.int16)
    np.save(tmp_path / "i.npy", i16)
    img = read_image(tmp_path / "i.npy")
    assert img.meta.window_source == "minmax"
    assert img.meta.original_range == (float(i16.min()), float(i16.max()))
    assert img.data.min() == 0.0 and img.data.max() == 1.0


def test_zarr_array_and_group(tmp_path: Path) -> None:
    import zarr

    raw = ramp((24, 20))
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=raw.shape, dtype=raw.dtype, chunks=(8, 8))
    arr[...] = raw
    img = read_image(tmp_path / "a.zarr")
    np.testing.assert_allclose(img.data, raw / 255.0, atol=1e-6)
    group = zarr.open_group(str(tmp_path / "pyr.zarr"), mode="w")
    for name, factor in (("0", 1), ("1", 2)):
        level = group.create_array(name, shape=(1, 24 // factor, 20 // factor), dtype="uint8")
        level[...] = raw[None, ::factor, ::factor]
    img = read_image(tmp_path / "pyr.zarr")
    assert img.data.shape == (24, 20)  # full resolution, leading singleton axis squeezed
    assert any("'0'" in n for n in img.meta.notes)
    assert is_supported(tmp_path / "pyr.zarr")


def test_large_images_are_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dask.array as da
    import tifffile
    import zarr

    raw = ramp((64, 80), np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", raw, tile=(32, 32))
    np.save(tmp_path / "big.npy", raw)
    z = zarr.create_array(str(tmp_path / "big.zarr"), shape=raw.shape, dtype=raw.dtype, chunks=(32, 32))
    z[...] = raw
    write_png(tmp_path / "big.png", raw)
    write_dicom(tmp_path / "big.dcm", raw, photometric="MONOCHROME1", window=(30000, 60000))
    names = ("big.tif", "big.npy", "big.zarr", "big.png", "big.dcm")
    eager = {p: np.asarray(read_image(tmp_path / p).data) for p in names}
    monkeypatch.setattr(io_meta, "LAZY_THRESHOLD_PIXELS", 1000)
    for name, expected in eager.items():
        img = read_image(tmp_path / name)
        assert img.lazy is True and isinstance(img.data, da.Array), name
        assert img.data.dtype == np.float32
        np.testing.assert_allclose(img.data.compute(), expected, atol=1e-6)


# --------------------------------------------------------------------------- DICOM

def test_dicom_extensionless_monochrome1_window_spacing(tmp_path: Path) -> None:
    raw = ramp((40, 50), np.uint16, top=4000)
    path = write_dicom(tmp_path / "IM0001", raw, photometric="MONOCHROME1", window=(2000, 4000),
                       pixel_spacing=(0.15, 0.2))
    assert is_supported(path)
    img = read_image(path)
    _check_image(img, (40, 50))
    assert img.meta.window_source == "dicom_window" and img.meta.window == (2000.0, 4000.0)
    assert img.meta.spacing == (0.15, 0.2) and img.scale == (0.15, 0.2)
    assert img.meta.photometric == "MONOCHROME1" and img.meta.modality == "DX"
    # Inverted: the lowest stored value is the brightest pixel.
    assert img.data[0, 0] > 0.99 and img.data[-1, -1] < 0.01
    assert np.corrcoef(img.data.ravel(), raw.ravel())[0, 1] < -0.99


def test_dicom_imager_spacing_and_percentile_fallback(tmp_path: Path) -> None:
    raw = ramp((60, 40), np.uint16, top=1000)
    raw[0, 0] = 60000  # an outlier the percentile window ignores
    path = write_dicom(tmp_path / "a.dcm", raw, imager_spacing=(0.1, 0.1), rescale=(2.0, -100.0))
    img = read_image(path)
    assert img.meta.window_source == "percentile"
    assert img.meta.spacing == (0.1, 0.1)
    assert any("ImagerPixelSpacing" in n for n in img.meta.notes)
    assert any("percentile" in n for n in img.meta.notes)
    assert img.meta.original_range == (-100.0, 60000 * 2.0 - 100.0)  # after rescale
    center, width = img.meta.window
    assert center + width / 2 < 5000  # outlier excluded
    assert np.corrcoef(img.data.ravel()[1:], raw.ravel()[1:])[0, 1] > 0.99


def test_dicom_without_preamble(tmp_path: Path) -> None:
    raw = ramp((20, 30), np.uint16, top=4000)
    path = write_dicom(tmp_path / "bare", raw, preamble=False)
    img = read_image(path)
    assert img.data.shape == (20, 30)
    assert np.corrcoef(img.data.ravel(), raw.ravel())[0, 1] > 0.99


def test_multiframe_dicom_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "mf.dcm", np.zeros((3, 16, 16), np.uint16))
    with pytest.raises(ReaderError, match=r"mf\.dcm.*\(3, 16, 16\)"):
        read_image(path)


def test_dicom_sr_is_not_an_image(tmp_path: Path) -> None:
    path = write_sr(tmp_path / "report.dcm")
    with pytest.raises(ReaderError, match=r"report\.dcm: not an image \(SOP class .*Text SR"):
        read_image(path)


def test_dicom_directory_sorted_by_instance_number(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    for name, number in (("a.dcm", 3), ("b.dcm", 1), ("c", 2)):
        write_dicom(folder / name, np.full((8, 8), number * 100, np.uint16), instance=number)
    write_sr(folder / "sr.dcm")
    (folder / "notes.txt").write_text("hello")
    images = read_path(folder)
    assert [Path(i.meta.source).name for i in images] == ["b.dcm", "c", "a.dcm"]
    assert any("sr.dcm" in n for n in images[0].meta.notes)  # skipped, with a note
    assert is_supported(folder)


# --------------------------------------------------------------------------- bad input

BAD_CASES = {
    "empty.png": (lambda p: p.write_bytes(b""), "empty"),
    "text.png": (lambda p: p.write_text("this is not an image\n"), "not a PNG"),
    "trunc.png": (lambda p: p.write_bytes(_png_bytes()[:200]), "truncated"),
    "nan.npy": (lambda p: np.save(p, np.array([[0.0, np.nan], [1.0, np.inf]])), "NaN/Inf"),
    "vol.npy": (lambda p: np.save(p, np.zeros((4, 5, 6), np.uint8)), "(4, 5, 6)"),
    "obj.npy": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "pickle"),
    "trunc.npy": (lambda p: p.write_bytes(_npy_bytes()[:150]), "truncated"),
    "trunc.dcm": (lambda p: p.write_bytes(_dicom_bytes(p)[:-500]), "truncated"),
    "junk.dcm": (lambda p: p.write_bytes(b"\x01\x02" * 200), "DICOM"),
    "trunc.tif": (lambda p: p.write_bytes(_tiff_bytes(p)[:100]), "TIFF"),
}


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="png")
    return buf.getvalue()


def _npy_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((32, 32), np.float32))
    return buf.getvalue()


def _dicom_bytes(p: Path) -> bytes:
    tmp = write_dicom(p.with_suffix(".full"), ramp((32, 32), np.uint16))
    return tmp.read_bytes()


def _tiff_bytes(p: Path) -> bytes:
    import tifffile

    tifffile.imwrite(p.with_suffix(".full"), ramp((32, 32)))
    return p.with_suffix(".full").read_bytes()


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_files_give_one_line_reader_error(tmp_path: Path, name: str) -> None:
    make, expected = BAD_CASES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(ReaderError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert expected.lower() in message.lower()
    assert "\n" not in message and "Traceback" not in message
    assert info.value.path == str(path)


def test_missing_file_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ReaderError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "x.txt").write_text("x")
    assert not is_supported(tmp_path / "x.txt")
    assert not is_supported(tmp_path / "nope.png")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert not is_supported(empty)
    with pytest.raises(ReaderError, match="no supported image files"):
        read_path(empty)
