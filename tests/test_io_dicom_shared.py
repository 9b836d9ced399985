"""Every file in ../shared/data/dicom_xray: orientation, inversion, spacing, failures.

Skipped cleanly when the shared data is absent. Each image is decoded once per
module (``_load``) to keep the suite fast.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from fixtures_io import shared_data_root

from mim_workbench.errors import ReaderError
from mim_workbench.io import info_records, read_image, read_mask, read_path

ROOT = shared_data_root()
DICOM_DIR = ROOT / "dicom_xray" if ROOT is not None else None
pytestmark = pytest.mark.skipif(DICOM_DIR is None or not DICOM_DIR.is_dir(), reason="../shared/data/dicom_xray not present")


def _manifest() -> list[dict[str, str]]:
    if DICOM_DIR is None or not (DICOM_DIR / "manifest.tsv").is_file():
        return []
    with open(DICOM_DIR / "manifest.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


ROWS = _manifest()
IMAGES = [r["file"] for r in ROWS if r["modality"] != "SEG" and r["decodes_with_pydicom+pylibjpeg"].startswith("yes")]
UNDECODABLE = [r["file"] for r in ROWS if r["decodes_with_pydicom+pylibjpeg"].startswith("no")]
SEGS = [r["file"] for r in ROWS if r["modality"] == "SEG"]


@lru_cache(maxsize=None)
def _load(name: str):
    return read_image(DICOM_DIR / name)


@lru_cache(maxsize=None)
def _reference(name: str) -> tuple[np.ndarray, np.ndarray, object]:
    """pydicom's own modality+VOI output and the raw stored values."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(DICOM_DIR / name)
    raw = ds.pixel_array
    ref = apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float64)
    if np.ptp(ref) == 0:  # header window misses the data entirely: compare with the rescaled values
        ref = apply_modality_lut(raw, ds).astype(np.float64)
    return raw, ref, ds


def _small(a: np.ndarray, n: int = 96) -> np.ndarray:
    step = max(1, max(a.shape) // n)
    return np.asarray(a, dtype=np.float64)[::step, ::step]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_manifest_lists_files() -> None:
    assert IMAGES and UNDECODABLE and SEGS


@pytest.mark.parametrize("name", IMAGES)
def test_orientation_matches_pydicom(name: str) -> None:
    img = _load(name)
    raw, ref, ds = _reference(name)
    data = np.asarray(img.data)
    assert data.dtype == np.float32 and data.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.max() > data.min()
    ours = _small(data)
    expected = _small(ref)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = -expected  # we invert; pydicom's VOI output does not
    straight = _corr(ours, expected)
    assert straight > 0.9, straight
    # No flip or transposition: the straight comparison beats every alternative.
    alternatives = [np.flipud(expected), np.fliplr(expected), np.rot90(expected, 2)]
    if expected.shape[0] == expected.shape[1]:
        alternatives.append(expected.T)
    for alt in alternatives:
        assert straight > _corr(ours, alt) + 0.05


@pytest.mark.parametrize("name", IMAGES)
def test_monochrome1_inverted_and_spacing(name: str) -> None:
    img = _load(name)
    raw, _ref, ds = _reference(name)
    corr = _corr(_small(np.asarray(img.data)), _small(raw))
    if ds.PhotometricInterpretation == "MONOCHROME1":
        assert corr < -0.5, corr
        assert any("MONOCHROME1" in n for n in img.meta.notes)
    else:
        assert corr > 0.5, corr
    header = None
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in ds and all(float(v) > 0 for v in ds[tag].value):
            header = tuple(float(v) for v in ds[tag].value)
            break
    assert img.meta.spacing == header
    assert img.meta.modality == ds.Modality
    assert img.meta.window_source in {"voi_lut", "dicom_window", "percentile"}


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_names_file_and_syntax(name: str) -> None:
    with pytest.raises(ReaderError) as info:
        read_image(DICOM_DIR / name)
    message = str(info.value)
    assert name in message and "JPEG Extended" in message and "decoder" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", SEGS)
def test_seg_loads_as_mask(name: str) -> None:
    mask = read_mask(DICOM_DIR / name)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16)
    assert set(np.unique(mask)) == {0, 1}
    (loaded,) = read_path(DICOM_DIR / name)
    assert loaded.meta.kind == "mask" and np.array_equal(loaded.data, mask)
    with pytest.raises(ReaderError, match="segmentation.*mask"):
        read_image(DICOM_DIR / name)
    resized = read_mask(DICOM_DIR / name, shape=(32, 32))
    assert resized.shape == (32, 32) and resized.sum() == 4 * mask.sum()


def test_info_records_for_the_folder() -> None:
    import json

    records = {Path(r["path"]).name: r for r in info_records(DICOM_DIR)}
    assert set(IMAGES + UNDECODABLE + SEGS) <= set(records)
    for name in UNDECODABLE:
        assert "error" in records[name]
    for name in SEGS:
        assert records[name]["kind"] == "mask"
    for name in IMAGES:
        assert records[name]["dtype"] == "float32" and 0 <= records[name]["min"] <= records[name]["max"] <= 1
    json.dumps(list(records.values()))
