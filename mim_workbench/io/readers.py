"""Public entry points: :func:`read_image`, :func:`read_path`, :func:`is_supported`.

Every failure surfaces as :class:`~mim_workbench.errors.ReaderError` with the
file and one line saying what is wrong; a third-party traceback never becomes
the message (it stays attached as ``__cause__`` for debugging).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mim_workbench.errors import ReaderError
from mim_workbench.io import dicom as _dicom
from mim_workbench.io import raster as _raster
from mim_workbench.io.arrays import image_from_array
from mim_workbench.io.formats import is_zarr_dir, looks_supported, sniff
from mim_workbench.io.meta import LoadedImage

T = TypeVar("T")


def guarded(path: str | Path, fn: Callable[[], T]) -> T:
    """Run a reader, converting any stray exception into a one-line ReaderError."""
    try:
        return fn()
    except ReaderError:
        raise
    except MemoryError:
        raise ReaderError(path, "not enough memory to decode this image") from None
    except Exception as exc:
        raise ReaderError(path, f"unexpected failure while reading ({type(exc).__name__}: {_raster.one_line(exc)})") from exc


def _decode_raster(p: Path, fmt: str) -> _raster.Decoded:
    if fmt in ("png", "jpeg"):
        return _raster.decode_pil(p, fmt)
    if fmt == "tiff":
        return _raster.decode_tiff(p)
    if fmt == "npy":
        return _raster.decode_npy(p)
    if fmt == "zarr":
        return _raster.decode_zarr(p)
    raise ReaderError(p, f"unsupported format {fmt}")


def _read_image(p: Path, keep_color: bool) -> LoadedImage:
    fmt, notes = sniff(p)
    if fmt == "dicom":
        return _dicom.read_dicom_image(p, keep_color=keep_color, notes=notes)
    decoded = _decode_raster(p, fmt)
    return image_from_array(
        decoded.array, str(p), keep_color=keep_color, notes=notes + decoded.notes,
        photometric=decoded.photometric, invert=decoded.invert,
    )


def read_image(path: str | os.PathLike, *, keep_color: bool = False) -> LoadedImage:
    """Read one image (DICOM, PNG, JPEG, TIFF, npy, zarr) as float32 in [0, 1].

    Colour becomes grey unless ``keep_color``; images above
    ``LAZY_THRESHOLD_PIXELS`` come back as dask arrays (``lazy=True``).
    A DICOM SEG raises: it is a mask (use :func:`read_mask`).
    """
    p = Path(path)
    return guarded(p, lambda: _read_image(p, keep_color))


def _read_one(p: Path, keep_color: bool) -> LoadedImage:
    fmt, notes = sniff(p)
    if fmt == "dicom":
        ds = _dicom.load(p)
        if _dicom.is_segmentation(ds):
            return _dicom.seg_image(p, ds)
        return _dicom.read_dicom_image(p, keep_color=keep_color, ds=ds, notes=notes)
    return _read_image(p, keep_color)


def list_image_files(folder: Path) -> list[Path]:
    """Supported files (and zarr stores) directly inside ``folder``, by name."""
    try:
        entries = sorted(folder.iterdir(), key=lambda q: q.name)
    except OSError as exc:
        raise ReaderError(folder, f"cannot list directory ({exc.strerror or exc})") from None
    return [q for q in entries if looks_supported(q)]


def _sort_key(p: Path) -> tuple[int, float, str]:
    """InstanceNumber first (DICOM series order), then file name."""
    if p.is_file() and sniff_is_dicom(p):
        try:
            number = _dicom.instance_number(_dicom.load(p, header_only=True))
        except ReaderError:
            number = None
        if number is not None:
            return (0, float(number), p.name)
    return (1, 0.0, p.name)


def sniff_is_dicom(p: Path) -> bool:
    """True when the file's content says DICOM; False for other formats and files that cannot be sniffed."""
    try:
        return sniff(p)[0] == "dicom"
    except ReaderError:
        return False


def read_path(path: str | os.PathLike, *, keep_color: bool = False) -> list[LoadedImage]:
    """Read a file or a folder (one LoadedImage per image file; SEG files as kind "mask").

    A folder is read non-recursively and ordered by DICOM InstanceNumber, then
    name. Files that fail, and DICOM objects without pixels (SR, ...), are
    skipped with a note on the first returned image; a folder with nothing
    readable raises ReaderError.
    """
    p = Path(path)
    if not p.exists():
        raise ReaderError(p, "file not found")
    if p.is_file() or is_zarr_dir(p):
        return [guarded(p, lambda: _read_one(p, keep_color))]
    files = list_image_files(p)
    if not files:
        raise ReaderError(p, "directory holds no supported image files")
    files.sort(key=_sort_key)
    loaded: list[LoadedImage] = []
    skipped: list[str] = []
    for f in files:
        try:
            loaded.append(guarded(f, lambda f=f: _read_one(f, keep_color)))
        except ReaderError as exc:
            skipped.append(f"skipped {f.name}: {exc.problem}")
    if not loaded:
        raise ReaderError(p, f"no readable images in directory ({skipped[0] if skipped else 'none'})")
    loaded[0].meta.notes.extend(skipped)
    return loaded


def is_supported(path: str | os.PathLike) -> bool:
    """Whether :func:`read_path` should be tried (used by the napari reader hook).

    Supported: .dcm .dicom .png .jpg .jpeg .tif .tiff .npy files, zarr stores,
    extension-less (or UID-named) files with the DICOM 'DICM' magic, and folders
    directly holding any of these. Nothing is decoded.
    """
    p = Path(path)
    if not p.exists():
        return False
    if p.is_dir() and not is_zarr_dir(p):
        try:
            return any(looks_supported(q) for q in p.iterdir())
        except OSError:
            return False
    return looks_supported(p)
