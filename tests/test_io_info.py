"""info_records(), is_supported(), read_path() and the package surface."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from fixtures_io import ramp, write_dicom, write_png

import mim_workbench.io as io
from mim_workbench.io import info_records, is_supported, read_path

CONTRACT = {"ImageMeta", "LoadedImage", "read_image", "read_mask", "read_path", "is_supported",
            "info_records", "letterbox", "Letterbox", "LAZY_THRESHOLD_PIXELS"}


def test_contract_names_exported() -> None:
    assert CONTRACT <= set(io.__all__)
    assert io.LAZY_THRESHOLD_PIXELS == 32_000_000
    from mim_workbench.io.datasets import DatasetIndex, Sample, discover, patient_split  # noqa: F401
    from mim_workbench.training.mim_dataset import MIMDataset  # noqa: F401


def test_reading_images_does_not_import_torch() -> None:
    code = "import sys, mim_workbench.io, mim_workbench.io.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_records_folder_with_good_and_bad(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", ramp((20, 30)))
    write_dicom(tmp_path / "b.dcm", ramp((10, 12), np.uint16, top=1000), pixel_spacing=(0.5, 0.5))
    (tmp_path / "bad.png").write_text("nope")
    (tmp_path / "labels.csv").write_text("id\n")
    records = list(info_records(tmp_path))
    assert [Path(r["path"]).name for r in records] == ["a.png", "b.dcm", "bad.png"]
    a, b, bad = records
    assert a["shape"] == [20, 30] and a["dtype"] == "float32" and a["window_source"] == "dtype_range"
    assert a["min"] == 0.0 and a["max"] == 1.0 and a["lazy"] is False and a["original_dtype"] == "uint8"
    assert b["spacing"] == [0.5, 0.5] and b["modality"] == "DX" and b["window_source"] == "percentile"
    assert set(bad) == {"path", "error"} and "\n" not in bad["error"]
    assert bad["error"].startswith(str(tmp_path / "bad.png") + ": not a PNG")
    for r in records:
        json.loads(json.dumps(r))
    (single,) = info_records(tmp_path / "a.png")
    assert single == a


def test_is_supported_variants(tmp_path: Path) -> None:
    write_png(tmp_path / "x.PNG", ramp((4, 4)))
    write_dicom(tmp_path / "1.2.840.99.1", ramp((4, 4), np.uint16))  # UID-named, no real extension
    (tmp_path / "plain").write_bytes(b"\0" * 200)
    assert is_supported(tmp_path / "x.PNG")
    assert is_supported(tmp_path / "1.2.840.99.1")
    assert not is_supported(tmp_path / "plain")
    assert is_supported(tmp_path)
    names = [Path(i.meta.source).name for i in read_path(tmp_path)]
    assert names == ["1.2.840.99.1", "x.PNG"]  # DICOM with an InstanceNumber-less header sorts by name


def test_read_path_single_file(tmp_path: Path) -> None:
    (img,) = read_path(write_png(tmp_path / "a.png", ramp((5, 6))))
    assert img.meta.kind == "image" and img.data.shape == (5, 6)
