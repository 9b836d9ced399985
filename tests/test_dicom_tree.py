"""A hospital export is a data set: a patient/study/series tree of extension-less DICOM files
(with or without a DICOMDIR) is found by content, split by PatientID, its SEG objects become
masks of the images they reference, and objects that are not images are skipped and counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mim_workbench.io import read_mask
from mim_workbench.io.datasets import discover, patient_split

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"      # Basic Text SR
PR_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"       # Grayscale Softcopy Presentation State
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _copy_image(src: Path, dst: Path, patient: str) -> str:
    ds = dcmread(src)
    ds.PatientID = patient
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return ds.SOPInstanceUID


def _plain(dst: Path, sop_class: str, modality: str, patient: str, **attrs) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, patient
    for k, v in attrs.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def _seg(dst: Path, patient: str, referenced: str, shape: tuple[int, int]) -> np.ndarray:
    region = np.zeros(shape, bool)
    region[shape[0] // 4: shape[0] // 2, shape[1] // 4: shape[1] // 2] = True
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = referenced
    series = Dataset()
    series.ReferencedInstanceSequence = [ref]
    _plain(dst, SEG_CLASS, "SEG", patient, SegmentationType="BINARY", Rows=shape[0], Columns=shape[1],
           NumberOfFrames=1, BitsAllocated=1, BitsStored=1, HighBit=0, SamplesPerPixel=1, PixelRepresentation=0,
           PhotometricInterpretation="MONOCHROME2", ReferencedSeriesSequence=[series],
           PixelData=np.packbits(region.ravel(), bitorder="little").tobytes())
    return region


@pytest.fixture
def tree(tmp_path, sample_root) -> dict:
    root = tmp_path / "export"
    dx, cr = sample_root / "dicom" / "hd_dx_image.dcm", sample_root / "dicom" / "RG3_J2KI.dcm"
    a_dx = _copy_image(dx, root / "PAT_A" / "STUDY1" / "SERIES1" / "IM00001", "A")
    _copy_image(cr, root / "PAT_A" / "STUDY1" / "SERIES2" / "IM00001", "A")
    _copy_image(dx, root / "PAT_B" / "STUDY7" / "SERIES1" / "IM00001", "B")
    _plain(root / "PAT_B" / "STUDY7" / "SERIES9" / "SR00001", SR_CLASS, "SR", "B")
    _plain(root / "PAT_B" / "STUDY7" / "SERIES8" / "PR00001", PR_CLASS, "PR", "B")
    shape = (int(dcmread(dx).Rows), int(dcmread(dx).Columns))
    region = _seg(root / "PAT_A" / "STUDY1" / "SERIES3" / "SEG00001", "A", a_dx, shape)
    return {"root": root, "region": region}


def test_tree_is_found_by_content_with_patients_masks_and_skips(tree):
    index = discover(tree["root"])
    assert index.kind == "dicom_tree" and len(index) == 3
    ids = sorted(s.id for s in index.samples)
    assert ids == ["PAT_A_STUDY1_SERIES1_IM00001", "PAT_A_STUDY1_SERIES2_IM00001", "PAT_B_STUDY7_SERIES1_IM00001"]
    assert sorted(s.patient for s in index.samples) == ["A", "A", "B"]
    with_mask = [s for s in index.samples if s.mask is not None]
    assert [s.id for s in with_mask] == ["PAT_A_STUDY1_SERIES1_IM00001"]
    assert np.array_equal(read_mask(with_mask[0].mask) > 0, tree["region"])
    report = index.notes[0]
    assert report.startswith("DICOM tree: 3 image(s)") and "1 with a SEG mask" in report
    assert "skipped 2 non-image object(s) (PR 1, SR 1)" in report
    assert "DX 2" in report and "sizes" in report


def test_patient_split_keeps_a_patients_images_together(tree):
    index = discover(tree["root"])
    split = patient_split(index.samples, val=0.5, seed=0)
    where = {s.id: name for name, part in split.items() for s in part}
    assert sorted(where) == sorted(s.id for s in index.samples)
    parts_of = {p: {where[s.id] for s in index.samples if s.patient == p} for p in ("A", "B")}
    assert parts_of["A"] != parts_of["B"] and all(len(v) == 1 for v in parts_of.values())


def test_dicomdir_lists_the_files(tree):
    from pydicom.fileset import FileSet

    root = tree["root"]
    fs = FileSet()
    for f in sorted(root.rglob("IM*")):
        fs.add(dcmread(f))
    out = root.parent / "cd"
    fs.write(out)
    index = discover(out)
    assert index.kind == "dicom_tree" and len(index) == 3


def test_info_reads_the_trees_images(tree):
    proc = subprocess.run([sys.executable, "-m", "mim_workbench.cli", "info", str(tree["root"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 3 and {r["modality"] for r in records} == {"DX", "CR"}
    assert not any("A" == str(v) or "B" == str(v) for r in records for v in r.values()), "no PatientID in output"
