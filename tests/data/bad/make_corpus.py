"""The bad-input corpus: broken, odd and hostile inputs, and what each must produce.

Generated rather than committed (every file is a few hundred bytes to write, and a
generator documents *how* each file is broken).  ``python tests/data/bad/make_corpus.py
DIR`` writes the files to DIR and prints one JSON line per case; the tests call
:func:`make_corpus` on a temporary folder.

Each :class:`Case` says what must happen: ``outcome="error"`` -> that error class with
``expect`` in its one-line message; ``outcome="recover"`` -> it loads, and ``expect``
appears in the notes/warnings that say what was done about it.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (64, 80)  # the image the mask cases belong to


@dataclass
class Case:
    name: str             # file or folder under the corpus directory
    kind: str             # image | mask | dataset | config
    outcome: str          # error | recover
    error: str | None     # ReaderError | DatasetError | ConfigError (outcome "error")
    expect: str           # text in the error message, or in the recovery note / warning
    why: str              # what is wrong with the input


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _ramp(shape: tuple[int, int] = IMAGE_SHAPE, top: int = 255, dtype=np.uint8) -> np.ndarray:
    h, w = shape
    return (np.add.outer(np.arange(h), np.arange(w)) * top // max(1, h + w - 2)).astype(dtype)


def _disc(shape: tuple[int, int] = IMAGE_SHAPE) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 3) ** 2).astype(np.uint8) * 255


def dicom_bytes(pixels: np.ndarray | None = None, *, transfer_syntax: str | None = None,
                encapsulated: bytes | None = None, phi: dict[str, str] | None = None) -> bytes:
    """A small DX DICOM; ``pixels=None`` writes the image header without PixelData."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = "1.2.840.10008.5.1.4.1.1.1.1"   # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, meta.MediaStorageSOPInstanceUID, "DX"
    for key, value in (phi or {}).items():
        setattr(ds, key, value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    shape = pixels.shape if pixels is not None else IMAGE_SHAPE
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    if encapsulated is not None:
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    elif pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tiff_bytes(array: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="minisblack")  # else 3-4 slices read as planar RGB(A)
    return buf.getvalue()


def _dataset(root: Path, labels_csv: str | None, *, mask_names: list[str] | None = None, n: int = 3) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "images" / f"img{i}.png").write_bytes(_png_bytes(_ramp()))
    if mask_names is not None:
        (root / "masks").mkdir(exist_ok=True)
        for name in mask_names:
            (root / "masks" / name).write_bytes(_png_bytes(_disc()))
    if labels_csv is not None:
        (root / "labels.csv").write_text(labels_csv, encoding="utf-8")


def make_corpus(dest: str | Path) -> list[Case]:
    """Write every case under ``dest`` and return the list of cases."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, data: bytes | str | None, kind: str, outcome: str, error: str | None,
            expect: str, why: str) -> None:
        if isinstance(data, str):
            (dest / name).write_text(data, encoding="utf-8")
        elif data is not None:
            (dest / name).write_bytes(data)
        cases.append(Case(name, kind, outcome, error, expect, why))

    png = _png_bytes(_ramp())
    dcm = dicom_bytes(_ramp(top=4095, dtype=np.uint16))
    # ---------------------------------------------------------------- images
    add("zero_byte.png", b"", "image", "error", "ReaderError", "empty (0 bytes)", "zero-byte file")
    add("zero_byte.dcm", b"", "image", "error", "ReaderError", "empty (0 bytes)", "zero-byte DICOM")
    add("truncated.png", png[: len(png) // 2], "image", "error", "ReaderError", "truncated PNG",
        "PNG cut in half")
    add("truncated.dcm", dcm[: len(dcm) - 3000], "image", "error", "ReaderError", "truncated",
        "DICOM whose pixel data stops early")
    add("no_pixels.dcm", dicom_bytes(None), "image", "error", "ReaderError", "no pixel data",
        "DICOM image header without PixelData")
    # MPEG-2 video (no pydicom decoder) with junk as the compressed frame.
    add("unsupported_codec.dcm", dicom_bytes(_ramp(dtype=np.uint16), transfer_syntax="1.2.840.10008.1.2.4.100",
                                             encapsulated=b"\xff\x0a" + b"\0" * 64),
        "image", "error", "ReaderError", "no decoder for transfer syntax", "compressed with a codec we cannot decode")
    add("text.dcm", "PatientName: nobody\nthis is a text file\n" * 10, "image", "error", "ReaderError",
        "not a DICOM file", "a text file named .dcm")
    add("text.png", "hello\n", "image", "error", "ReaderError", "not a PNG file", "a text file named .png")
    add("png_named.tif", png, "image", "recover", None, "content is PNG although the extension is .tif",
        "wrong extension: a PNG named .tif")
    add("dicom_named.png", dcm, "image", "recover", None, "content is DICOM although the extension is .png",
        "wrong extension: a DICOM named .png")
    add("stack3d.tif", _tiff_bytes(np.zeros((4, 32, 32), np.uint8)), "image", "error", "ReaderError",
        "3-D volume or stack", "a 3-D stack of 4 slices (grey, not planar RGBA)")
    add("stack3d.npy", _npy_bytes(np.zeros((5, 16, 16), np.float32)), "image", "error", "ReaderError",
        "3-D volume or stack", "a 3-D volume in .npy")
    rgba = np.dstack([_ramp(), _ramp()[::-1], _ramp()[:, ::-1], np.full(IMAGE_SHAPE, 128, np.uint8)])
    add("rgba.png", _png_bytes(rgba), "image", "recover", None, "alpha channel dropped", "RGBA colour image")
    add("one_pixel.png", _png_bytes(np.full((1, 1), 200, np.uint8)), "image", "recover", None, "",
        "a 1x1 image: reads (nothing to mask: reconstruct refuses it)")
    add("smaller_than_patch.png", _png_bytes(_ramp((9, 12))), "image", "recover", None, "",
        "9x12 px, smaller than one 16 px patch: reads (reconstruct refuses it)")
    nan = _ramp().astype(np.float32) / 255
    nan[3, 4] = np.nan
    inf = _ramp().astype(np.float32) / 255
    inf[5, 6] = np.inf
    add("nan.tif", _tiff_bytes(nan), "image", "error", "ReaderError", "NaN/Inf", "float TIFF with a NaN")
    add("inf.npy", _npy_bytes(inf), "image", "error", "ReaderError", "NaN/Inf", "float .npy with an Inf")
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    add("pickled.npy", obj.getvalue(), "image", "error", "ReaderError", "pickle", ".npy holding Python objects")
    # ---------------------------------------------------------------- masks (for a 64 x 80 image)
    add("mask_other_size.png", _png_bytes(_disc((32, 40))), "mask", "recover", None, "resampled",
        "mask at half the image's resolution (same aspect)")
    add("mask_other_aspect.png", _png_bytes(_disc((64, 64))), "mask", "error", "ReaderError",
        "does not match image shape (64, 80)", "square mask for a 64 x 80 image")
    add("mask_empty.png", _png_bytes(np.zeros(IMAGE_SHAPE, np.uint8)), "mask", "recover", None,
        "fell back to random", "empty region mask: region-guided masking masks at random, with a warning")
    add("mask_3d.npy", _npy_bytes(np.zeros((2,) + IMAGE_SHAPE, np.uint8)), "mask", "error", "ReaderError",
        "expected a 2-D mask", "a stack of masks")
    nan_mask = np.zeros(IMAGE_SHAPE, np.float32)
    nan_mask[0, 0] = np.nan
    add("mask_nan.npy", _npy_bytes(nan_mask), "mask", "error", "ReaderError", "NaN/Inf", "float mask with NaN")
    # ---------------------------------------------------------------- datasets and labels
    _dataset(dest / "ds_mask_no_overlap", None, mask_names=["other0.png", "other1.png"])
    cases.append(Case("ds_mask_no_overlap", "dataset", "recover", None, "match no image stems",
                      "mask folder whose names match no image: no masks used (region strategy refuses)"))
    _dataset(dest / "ds_labels_unknown_ids", "id,label\nimg0,a\nimg1,b\nimg2,a\nghost7,b\n")
    cases.append(Case("ds_labels_unknown_ids", "dataset", "recover", None, "1 row(s) match no image file",
                      "labels.csv lists an id with no image"))
    _dataset(dest / "ds_labels_duplicate_conflict", "id,label\nimg0,a\nimg1,b\nimg0,b\n")
    cases.append(Case("ds_labels_duplicate_conflict", "dataset", "error", "DatasetError",
                      "'img0' repeats line 2 with a different label", "the same id twice with two labels"))
    _dataset(dest / "ds_labels_duplicate_same", "id,label\nimg0,a\nimg1,b\nimg0,a\n")
    cases.append(Case("ds_labels_duplicate_same", "dataset", "recover", None, "1 repeated row(s)",
                      "the same row twice"))
    _dataset(dest / "ds_labels_no_id_column", "name,label\nimg0,a\n")
    cases.append(Case("ds_labels_no_id_column", "dataset", "recover", None, "no id/image/filename column; ignored",
                      "labels.csv without an id column"))
    _dataset(dest / "ds_labels_no_label_column", "id,site\nimg0,x\n")
    cases.append(Case("ds_labels_no_label_column", "dataset", "recover", None, "no label column",
                      "labels.csv without a label column"))
    add("manifest_no_image_column.csv", "file_id,label\na,b\n", "dataset", "error", "DatasetError",
        "manifest needs an 'image' column", "CSV manifest without an image column")
    add("manifest_missing_file.csv", "image,label\nnowhere.png,a\n", "dataset", "error", "DatasetError",
        "image not found", "CSV manifest naming a missing image")
    # ---------------------------------------------------------------- configs
    add("config_wrong_type.json", json.dumps({"batch_size": "16"}), "config", "error", "ConfigError",
        "batch_size='16': expected int", "a number written as a string")
    add("config_bool_string.json", json.dumps({"cache": "no"}), "config", "error", "ConfigError",
        "cache='no': expected bool", "a truthy string where a bool belongs")
    add("config_unknown_key.json", json.dumps({"batch_sise": 16}), "config", "error", "ConfigError",
        "unknown config key(s): batch_sise", "a typo in a key")
    add("config_bad_range.toml", "ratio = 1.5\n", "config", "error", "ConfigError", "ratio=1.5",
        "a ratio outside 0-1")
    add("config_not_json.json", "{batch_size: 16", "config", "error", "ConfigError", "not valid JSON",
        "broken JSON")
    add("config_list.json", "[1, 2]", "config", "error", "ConfigError", "mapping", "a list, not a mapping")
    return cases


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_corpus.py DIR", file=sys.stderr)
        return 2
    for case in make_corpus(argv[0]):
        print(json.dumps(asdict(case)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
