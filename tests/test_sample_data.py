"""Sample data ships inside the package and loads through the core readers."""

import csv

import numpy as np
import pydicom

from mim_workbench import sample
from mim_workbench.io import read_image, read_mask
from mim_workbench.io.datasets import discover


def test_sample_chest_xrays_have_masks_and_licences(sample_root):
    rows = list(csv.DictReader(open(sample_root / "labels.csv")))
    assert len(rows) >= 12
    assert sum(r["label"] != "COVID-19" for r in rows) >= 3
    licences = (sample_root / "LICENSES.md").read_text()
    for r in rows:
        assert (sample_root / "images" / f"{r['id']}.png").is_file()
        assert (sample_root / "masks" / f"{r['id']}.png").is_file()
        assert f"images/{r['id']}.png" in licences
    assert len(sample.dicom_files()) == 2


def test_sample_dataset_discovers_with_labels_and_patients(sample_root):
    index = discover(sample_root)
    assert len(index.samples) >= 12
    assert all(s.mask is not None and s.label and s.patient for s in index.samples)
    assert set(index.classes) == {"COVID-19", "Other pneumonia"}


def test_chest_xray_and_lung_mask_align():
    img_path, mask_path = sample.chest_xray()
    img = read_image(img_path)
    mask = read_mask(mask_path, shape=img.data.shape)
    assert img.data.dtype == np.float32 and 0.0 <= img.data.min() < img.data.max() <= 1.0
    assert mask.shape == img.data.shape
    frac = mask.mean()
    assert 0.1 < frac < 0.75, f"lung fraction {frac:.2f} is implausible"


def test_mammogram_phantom_is_a_real_mg_dicom(tmp_path):
    path = sample.mammogram_phantom(tmp_path / "mg.dcm", shape=(400, 300))
    ds = pydicom.dcmread(path)
    assert ds.Modality == "MG" and ds.BitsStored == 12
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.1, 0.1]
    img = read_image(path)
    assert img.meta.modality == "MG" and img.meta.spacing == (0.1, 0.1)
    assert img.data.shape == (400, 300)
    # breast (left) brighter than background (right edge, mid-height)
    assert img.data[200, 20] > img.data[200, 295] + 0.2
