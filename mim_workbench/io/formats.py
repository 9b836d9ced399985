"""Recognising file formats from their content, not just their extension.

Why content sniffing: X-ray exports are often mislabeled (JPEG saved as
``.png``), DICOM files frequently have no extension at all, and a text file
named ``.png`` must give a clear error rather than a decoder traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from mim_workbench.errors import ReaderError

IMAGE_EXTENSIONS = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npy": "npy",
    ".zarr": "zarr",
}
SUPPORTED_EXTENSIONS = tuple(IMAGE_EXTENSIONS)

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x93NUMPY", "npy"),
)
_NEVER_IMAGES = {".csv", ".tsv", ".txt", ".md", ".json", ".jsonl", ".yaml", ".yml", ".xlsx", ".xls", ".pdf", ".html", ".py", ".zip", ".gz"}
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
# First group numbers of a DICOM data set written without the 128-byte preamble.
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x08\x00")


def _head(path: Path, n: int = 132) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise ReaderError(path, f"cannot open file ({exc.strerror or exc})") from None


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """True for a Part-10 DICOM file ('DICM' after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_zarr_dir(path: Path) -> bool:
    """A directory holding a zarr v2 or v3 array or group."""
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any((path / m).exists() for m in _ZARR_MARKERS))


def sniff(path: str | os.PathLike) -> tuple[str, list[str]]:
    """Return (format, notes) for one file or zarr directory; ReaderError when unusable.

    Formats: ``dicom``, ``png``, ``jpeg``, ``tiff``, ``npy``, ``zarr``. The content
    decides; a disagreeing extension only adds a note.
    """
    p = Path(path)
    if not p.exists():
        raise ReaderError(p, "file not found")
    if p.is_dir():
        if is_zarr_dir(p):
            return "zarr", []
        raise ReaderError(p, "is a directory, not an image file")
    size = p.stat().st_size
    if size == 0:
        raise ReaderError(p, "file is empty (0 bytes)")
    head = _head(p)
    ext = p.suffix.lower()
    by_ext = IMAGE_EXTENSIONS.get(ext)
    found = None
    if len(head) >= 132 and head[128:132] == b"DICM":
        found = "dicom"
    else:
        for magic, fmt in _MAGIC:
            if head.startswith(magic):
                found = fmt
                break
    if found is None and (by_ext == "dicom" or (ext == "" and head[:2] in _BARE_DICOM_GROUPS)):
        # DICOM without preamble: pydicom will tell (read with force).
        found = "dicom"
    if found is None:
        what = f"a {by_ext.upper()} file" if by_ext else "a supported image file"
        raise ReaderError(
            p,
            f"not {what}: content not recognised (starts with {head[:12]!r}); mislabeled or corrupt",
        )
    notes = []
    if by_ext is not None and by_ext != found:
        notes.append(f"file content is {found.upper()} although the extension is {ext}")
    return found, notes


def looks_supported(path: str | os.PathLike) -> bool:
    """Cheap check used by folder listing and the napari reader (no decoding)."""
    p = Path(path)
    name = p.name
    if name.startswith("."):
        return False
    if p.is_dir():
        return is_zarr_dir(p)
    ext = p.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return True
    if ext in _NEVER_IMAGES:
        return False
    # No or unknown extension (DICOM files are often named by UID): look for 'DICM'.
    return has_dicom_magic(p)
