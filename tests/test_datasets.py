"""discover() on every shared data set and on generated layouts; patient_split()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_io import ramp, shared_dir, write_dicom, write_png
from hypothesis import given, settings
from hypothesis import strategies as st

from mim_workbench.errors import ConfigError, DatasetError
from mim_workbench.io.datasets import DatasetIndex, Sample, discover, patient_split

# --------------------------------------------------------------------------- shared data


def test_cxr_covid_v7labs() -> None:
    idx = discover(shared_dir("cxr_covid_v7labs"))
    assert idx.kind == "images_masks" and len(idx.samples) == 268
    assert idx.n_masks == 232
    assert all(s.mask is None or s.mask.parent.name == "masks_v7labs" for s in idx.samples)
    assert any("masks_v7labs" in n and "masks_lungvae" in n for n in idx.notes)
    assert idx.classes == ["COVID-19", "No Finding", "Other pneumonia"]
    assert len({s.patient for s in idx.samples}) == 151
    assert all(s.label is not None and s.patient is not None for s in idx.samples)
    lungvae = discover(idx.root, masks=idx.root / "masks_lungvae")
    assert lungvae.n_masks == 140


def test_mammo_mini_mias_patients_pair_up() -> None:
    idx = discover(shared_dir("mammo_mini_mias"))
    assert len(idx.samples) == 160
    by_id = {s.id: s for s in idx.samples}
    assert by_id["mdb001"].patient == by_id["mdb002"].patient == "1"
    assert by_id["mdb003"].patient == "2" != by_id["mdb002"].patient
    assert set(idx.classes) == {"normal", "benign", "malignant"}
    assert idx.n_masks > 0 and all(s.mask.parent.name == "roi_masks" for s in idx.samples if s.mask)


def test_dental_dc1000_unlabelled_with_masks() -> None:
    idx = discover(shared_dir("dental_dc1000"))
    assert len(idx.samples) == 100 and idx.n_masks == 100
    assert all(s.mask.parent.name == "caries_masks" for s in idx.samples)
    assert all(s.label is None for s in idx.samples) and idx.classes == []


def test_dicom_xray_folder() -> None:
    root = shared_dir("dicom_xray")
    idx = discover(root)
    assert idx.kind == "image_folder"
    names = {s.image.name for s in idx.samples}
    expected = {p.name for p in root.glob("*.dcm")} - {"hd_seg_image_cr_binary.dcm"}
    assert names == expected
    assert any("hd_seg_image_cr_binary.dcm" in n for n in idx.notes)


# --------------------------------------------------------------------------- generated layouts


def _covid_radiography(root: Path) -> Path:
    """Two classes, 299 px images, 256 px masks, plus the xlsx the real download ships."""
    for cls, n in (("COVID", 3), ("Normal", 4)):
        for k in range(1, n + 1):
            write_png(root / cls / "images" / f"{cls}-{k}.png", ramp((299, 299)))
            write_png(root / cls / "masks" / f"{cls}-{k}.png", np.pad(np.full((128, 128), 255, np.uint8), 64))
        (root / f"{cls}.metadata.xlsx").write_bytes(b"PK")
    return root


def test_covid_radiography_layout(tmp_path: Path) -> None:
    idx = discover(_covid_radiography(tmp_path / "COVID-19_Radiography_Dataset"))
    assert idx.kind == "class_folders"
    assert len(idx.samples) == 7 and idx.n_masks == 7
    assert idx.classes == ["COVID", "Normal"]
    assert len({s.id for s in idx.samples}) == 7
    assert {s.id for s in idx.samples if s.label == "COVID"} == {"COVID/COVID-1", "COVID/COVID-2", "COVID/COVID-3"}
    assert all(s.mask.stem == s.image.stem for s in idx.samples)
    from mim_workbench.training.mim_dataset import MIMDataset

    item = MIMDataset(idx.samples[:1], img_size=64)[0]  # 256 px mask on a 299 px image
    assert item["has_region"] and abs(float(item["region"].mean()) - 0.25) < 0.02


def test_csv_manifest(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_png(tmp_path / "img" / f"{name}.png", ramp((20, 20)))
    write_png(tmp_path / "seg" / "a.png", np.full((20, 20), 255, np.uint8))
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,mask,label,Patient\nimg/a.png,seg/a.png,sick,p1\nimg/b.png,,healthy,p1\nimg/c.png,,,p2\n")
    idx = discover(manifest)
    assert idx.kind == "manifest" and [s.id for s in idx.samples] == ["a", "b", "c"]
    a, b, c = idx.samples
    assert a.mask == tmp_path / "seg" / "a.png" and b.mask is None
    assert (a.label, b.label, c.label) == ("sick", "healthy", None)
    assert (a.patient, b.patient, c.patient) == ("p1", "p1", "p2")
    assert idx.classes == ["healthy", "sick"]
    manifest.write_text("image,label\nimg/missing.png,x\n")
    with pytest.raises(DatasetError, match=r"train\.csv:2: image not found"):
        discover(manifest)
    manifest.write_text("file_name_is_wrong\nimg/a.png\n")
    with pytest.raises(DatasetError, match="'image' column"):
        discover(manifest)


def test_images_folder_with_labels_and_mask_naming(tmp_path: Path) -> None:
    for name in ("x1", "x2", "x3"):
        write_png(tmp_path / "images" / f"{name}.png", ramp((10, 10)))
    write_png(tmp_path / "lung_masks" / "x1_mask.png", np.full((10, 10), 255, np.uint8))
    write_png(tmp_path / "levels" / "x2.png", np.full((10, 10), 255, np.uint8))  # not a mask folder
    (tmp_path / "labels.csv").write_text("Filename,Label,PatientID\nx1.png,a,7\nx2.png,b,7\nzz.png,c,9\n")
    idx = discover(tmp_path)
    by_id = {s.id: s for s in idx.samples}
    assert by_id["x1"].mask.name == "x1_mask.png" and by_id["x2"].mask is None
    assert (by_id["x1"].label, by_id["x1"].patient) == ("a", "7")
    assert by_id["x3"].label is None
    assert any("1 image(s) have no row" in n for n in idx.notes)
    assert any("1 row(s) match no image" in n for n in idx.notes)


def test_plain_folder_dicom_patients_and_skips(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a.dcm", ramp((8, 8), np.uint16), patient_id="A")
    write_dicom(tmp_path / "b.dcm", ramp((8, 8), np.uint16), patient_id="B")
    (tmp_path / "readme.txt").write_text("hi")
    idx = discover(tmp_path)
    assert [s.patient for s in idx.samples] == ["A", "B"]


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        discover(tmp_path / "empty")
    with pytest.raises(DatasetError, match="mask folder not found"):
        write_png(tmp_path / "d" / "images" / "a.png", ramp((4, 4)))
        discover(tmp_path / "d", masks=tmp_path / "nope")


# --------------------------------------------------------------------------- patient_split


def _check_split(samples: list[Sample], split: dict[str, list[Sample]]) -> None:
    assert set(split) == {"train", "val", "test"}
    ids = [s.id for part in split.values() for s in part]
    assert sorted(ids) == sorted(s.id for s in samples)
    owner: dict[str, str] = {}
    for name, part in split.items():
        for s in part:
            key = s.patient if s.patient is not None else f"self:{s.id}"
            assert owner.setdefault(key, name) == name, f"patient {key} in {owner[key]} and {name}"


@settings(max_examples=60, deadline=None)
@given(
    patients=st.lists(st.one_of(st.none(), st.integers(0, 12)), min_size=1, max_size=60),
    labels=st.lists(st.sampled_from(["a", "b", None]), min_size=60, max_size=60),
    val=st.floats(0.0, 0.5),
    test=st.floats(0.0, 0.4),
    seed=st.integers(0, 2**16),
)
def test_patient_split_never_leaks(patients, labels, val, test, seed) -> None:
    samples = [Sample(id=f"s{i}", image=Path(f"s{i}.png"), label=labels[i],
                      patient=None if p is None else str(p)) for i, p in enumerate(patients)]
    split = patient_split(samples, val=val, test=test, seed=seed)
    _check_split(samples, split)
    again = patient_split(samples, val=val, test=test, seed=seed)
    assert {k: [s.id for s in v] for k, v in again.items()} == {k: [s.id for s in v] for k, v in split.items()}


def test_patient_split_is_order_independent_and_stratified() -> None:
    samples = [Sample(id=f"s{i}", image=Path(f"s{i}.png"), label="rare" if i % 10 == 0 else "common",
                      patient=str(i // 2)) for i in range(200)]
    split = patient_split(samples, val=0.2, test=0.1, seed=3)
    _check_split(samples, split)
    shuffled = patient_split(list(reversed(samples)), val=0.2, test=0.1, seed=3)
    assert {k: sorted(s.id for s in v) for k, v in shuffled.items()} == {k: sorted(s.id for s in v) for k, v in split.items()}
    assert 35 <= len(split["val"]) <= 45 and 15 <= len(split["test"]) <= 25
    for part in ("train", "val", "test"):
        assert any(s.label == "rare" for s in split[part])
    other = patient_split(samples, val=0.2, test=0.1, seed=4)
    assert {s.id for s in other["val"]} != {s.id for s in split["val"]}


def test_patient_split_small_and_invalid() -> None:
    samples = [Sample(id=f"s{i}", image=Path("x")) for i in range(3)]
    split = patient_split(samples, val=0.1, seed=0)
    assert len(split["val"]) == 1 and len(split["train"]) == 2  # val gets at least one
    with pytest.raises(ConfigError):
        patient_split(samples, val=0.6, test=0.5)
    with pytest.raises(ConfigError):
        patient_split(samples, val=-0.1)


def test_shared_split_no_leak() -> None:
    idx: DatasetIndex = discover(shared_dir("cxr_covid_v7labs"))
    split = patient_split(idx.samples, val=0.15, test=0.15, seed=0)
    _check_split(idx.samples, split)
