"""Decoding PNG, JPEG, TIFF, NumPy ``.npy`` and zarr into raw pixel arrays.

These functions only decode; the mapping to [0, 1] (documented in
:mod:`mim_workbench.io.normalize`: 8-bit /255, 16-bit by dtype range when the
top bit is used else min..max, floats kept when in [0, 1]) and the colour
policy happen in :func:`mim_workbench.io.arrays.image_from_array`.

Large images stay on disk where the format allows it: TIFF through tifffile's
zarr store, zarr arrays as they are, ``.npy`` memory-mapped; all wrapped as
dask arrays once above ``LAZY_THRESHOLD_PIXELS``. PNG and JPEG are decoded
whole by Pillow (they have no random access).

Third-party errors are caught here and re-raised as one-line
:class:`~mim_workbench.errors.ReaderError` messages naming the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io import meta as _meta


def one_line(exc: BaseException, limit: int = 160) -> str:
    """First line of an exception message, trimmed, for embedding in our own message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plane_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) of an array after dropping leading singleton axes (as arrays.as_2d does)."""
    dims = tuple(int(s) for s in shape)
    while len(dims) > 2 and dims[0] == 1:
        dims = dims[1:]
    return dims[:2]


@dataclass
class Decoded:
    """Raw pixels as stored (numpy or dask) plus what the container said about them."""

    array: Any
    photometric: str | None = None
    invert: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- PNG / JPEG

_PIL_PHOTOMETRIC = {"1": "MONOCHROME2", "L": "MONOCHROME2", "LA": "MONOCHROME2", "I": "MONOCHROME2",
                    "F": "MONOCHROME2", "RGB": "RGB", "RGBA": "RGBA", "P": "PALETTE COLOR",
                    "CMYK": "CMYK", "YCbCr": "YBR_FULL"}


def decode_pil(path: Path, fmt: str) -> Decoded:
    """PNG/JPEG via Pillow; forces full decoding so truncation is caught here."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                mode = im.mode
                photometric = _PIL_PHOTOMETRIC.get(mode.split(";")[0], mode)
                orientation = im.getexif().get(0x0112, 1) if fmt == "jpeg" else 1
                if orientation not in (0, 1):
                    im = ImageOps.exif_transpose(im)
                    notes.append(f"rotated/flipped per EXIF orientation {orientation}")
                if getattr(im, "n_frames", 1) > 1:
                    raise ReaderError(path, f"{fmt.upper()} holds {im.n_frames} frames; expected one 2-D image")
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif mode == "LA":
                    im = im.convert("L")
                    notes.append("alpha channel dropped")
                elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")
                array = np.asarray(im)
    except ReaderError:
        raise
    except Image.DecompressionBombError as exc:
        raise ReaderError(path, f"image too large for Pillow's safety limit ({one_line(exc)}); convert it to TIFF or zarr") from None
    except UnidentifiedImageError:
        raise ReaderError(path, f"not a decodable {fmt.upper()} image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ReaderError(path, f"corrupt or truncated {fmt.upper()} data ({one_line(exc)})") from None
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # older Pillow opens 16-bit PNG as mode "I"
    return Decoded(array=array, photometric=photometric, notes=notes)


# --------------------------------------------------------------------------- TIFF

def decode_tiff(path: Path) -> Decoded:
    """First series, full-resolution level; lazy through tifffile's zarr store when large."""
    import tifffile

    notes: list[str] = []
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ReaderError(path, "TIFF holds no image series")
            series = tif.series[0]
            level0 = series.levels[0] if getattr(series, "levels", None) else series
            shape = tuple(int(s) for s in level0.shape)
            page = series.keyframe
            photometric_name = getattr(page.photometric, "name", str(page.photometric))
            colormap = page.colormap if photometric_name == "PALETTE" else None
            if len(tif.series) > 1 and not tif.is_ome:
                notes.append(f"TIFF has {len(tif.series)} series; read the first")
            if len(getattr(series, "levels", [])) > 1:
                notes.append(f"pyramidal TIFF; read the full-resolution level of {len(series.levels)}")
            planar = series.axes.startswith("S") and len(shape) == 3 and shape[0] in (3, 4)
            plane = shape[1:] if planar else shape[:2]
            large = len(shape) in (2, 3) and _meta.is_large(plane)
            array = None if large else level0.asarray()
    except ReaderError:
        raise
    except Exception as exc:  # tifffile/imagecodecs raise many types; report one line
        raise ReaderError(path, f"corrupt or unsupported TIFF ({one_line(exc)})") from None
    if array is None:
        import dask.array as da
        import zarr

        try:
            store = tifffile.imread(path, aszarr=True, series=0, level=0)
            array = da.from_zarr(zarr.open(store, mode="r"))
        except Exception as exc:
            raise ReaderError(path, f"cannot open TIFF lazily ({one_line(exc)})") from None
        notes.append("read lazily from the TIFF via zarr")
    if planar:  # separate colour planes -> channel-last, as every other reader returns
        array = array.transpose((1, 2, 0))
    invert = photometric_name == "MINISWHITE"
    if colormap is not None:
        cmap = np.asarray(colormap)
        array = np.stack([cmap[c][np.asarray(array)] for c in range(3)], axis=-1)
        notes.append("palette TIFF expanded to RGB")
    photometric = {"MINISBLACK": "MONOCHROME2", "MINISWHITE": "MONOCHROME1", "RGB": "RGB",
                   "PALETTE": "PALETTE COLOR"}.get(photometric_name, photometric_name)
    return Decoded(array=array, photometric=photometric, invert=invert, notes=notes)


# --------------------------------------------------------------------------- NumPy

def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the .npy header, validating size and pickle use."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            major, minor = fmt.read_magic(fh)
            read_header = {1: fmt.read_array_header_1_0, 2: fmt.read_array_header_2_0,
                           3: fmt.read_array_header_2_0}.get(major)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {major}.{minor}")
            shape, _fortran, dtype = read_header(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ReaderError(path, f"not a valid .npy file ({one_line(exc)})") from None
    if dtype.hasobject:
        raise ReaderError(path, "npy holds Python objects (needs pickle); refused for safety")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise ReaderError(path, f"truncated .npy: {actual} bytes, header promises {expected}")
    return tuple(int(s) for s in shape), dtype, offset


def decode_npy(path: Path) -> Decoded:
    """``.npy`` without pickle; memory-mapped, materialised unless large."""
    shape, dtype, _offset = _npy_header(path)
    if dtype.kind not in "biuf":
        raise ReaderError(path, f"unsupported pixel type {dtype} in .npy")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ReaderError(path, f"unreadable .npy ({one_line(exc)})") from None
    if _meta.is_large(plane_shape(shape)):
        import dask.array as da

        return Decoded(array=da.from_array(array, chunks=(2048, 2048) + tuple(shape[2:])),
                       notes=["memory-mapped .npy read lazily"])
    return Decoded(array=np.array(array))


# --------------------------------------------------------------------------- zarr

def open_zarr_array(path: Path) -> tuple[Any, list[str]]:
    """Open a zarr array, or for a group its array "0" (OME-Zarr full resolution) or first array."""
    import zarr

    notes: list[str] = []
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ReaderError(path, f"not a readable zarr store ({one_line(exc)})") from None
    depth = 0
    while not hasattr(node, "dtype"):  # a group
        names = sorted(node.array_keys()) if hasattr(node, "array_keys") else []
        groups = sorted(node.group_keys()) if hasattr(node, "group_keys") else []
        if "0" in names:
            pick = "0"
        elif names:
            pick = names[0]
        elif groups and depth < 3:
            pick = "0" if "0" in groups else groups[0]
        else:
            raise ReaderError(path, "zarr group holds no arrays")
        notes.append(f"zarr group: read array '{pick}'")
        node = node[pick]
        depth += 1
    return node, notes


def decode_zarr(path: Path) -> Decoded:
    """A zarr array as dask when large, else loaded into memory."""
    array, notes = open_zarr_array(path)
    import dask.array as da

    lazy = _meta.is_large(plane_shape(array.shape))
    try:
        data = da.from_zarr(array) if lazy else np.asarray(array[...])
    except Exception as exc:
        raise ReaderError(path, f"corrupt zarr chunk data ({one_line(exc)})") from None
    return Decoded(array=data, notes=notes)
