"""Turning a decoded pixel array (numpy or dask) into a validated :class:`LoadedImage`.

Shared by all non-DICOM readers (and colour DICOM) so every format obeys the
same shape rules, the same NaN/Inf check, the same colour policy and the same
[0, 1] mapping (:mod:`mim_workbench.io.normalize`).

Shape rules: (H, W) is grey; (H, W, 1) is squeezed; (H, W, 3) / (H, W, 4) is
colour (alpha dropped); leading singleton axes (e.g. OME-Zarr's t/c/z of size 1)
are squeezed. Anything else, e.g. a 3-D volume or a stack, is an error naming
the shape -- a 2-D slice is never picked silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io import meta as _meta
from mim_workbench.io.meta import ImageMeta, LoadedImage, is_dask
from mim_workbench.io.normalize import check_finite, raster_window, to_grey, window_to_unit

if TYPE_CHECKING:
    import dask.array as da

#: Chunk edge used when a large in-memory array is wrapped as dask.
DASK_CHUNK = 2048

_OK_KINDS = "biuf"  # bool, signed, unsigned, float


def shape_str(shape: tuple[int, ...]) -> str:
    """``shape`` as ``"(H, W, ...)"`` with plain ints, for error messages."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def as_2d(array: np.ndarray | da.Array, path: str, *, what: str = "image") -> np.ndarray | da.Array:
    """``array`` squeezed to (H, W) or (H, W, 3|4), same kind (numpy or dask) and dtype.

    Raises ReaderError naming ``path`` for a non-numeric dtype, a volume or stack, or no pixels.
    """
    if array.dtype.kind not in _OK_KINDS:
        raise ReaderError(path, f"unsupported pixel type {array.dtype} for an {what}")
    shape = tuple(int(s) for s in array.shape)
    orig = shape
    while len(shape) > 2 and shape[0] == 1:
        array = array[0]
        shape = shape[1:]
    if len(shape) == 3 and shape[-1] == 1:
        array = array[..., 0]
        shape = shape[:2]
    if len(shape) < 2:
        raise ReaderError(path, f"expected a 2-D {what}, got an array of shape {shape_str(orig)}")
    if len(shape) == 3 and shape[-1] in (3, 4):
        pass
    elif len(shape) != 2:
        raise ReaderError(
            path,
            f"expected a 2-D {what}, got shape {shape_str(orig)} (a 3-D volume or stack; export one 2-D slice)",
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ReaderError(path, f"{what} has no pixels (shape {shape_str(orig)})")
    return array


def maybe_lazy(array: np.ndarray | da.Array) -> np.ndarray | da.Array:
    """``array`` wrapped as dask (chunks of ``DASK_CHUNK`` pixels) when above the lazy threshold, else as is."""
    if not is_dask(array) and _meta.is_large(tuple(array.shape)):
        import dask.array as da

        chunks = (DASK_CHUNK, DASK_CHUNK) + tuple(array.shape[2:])
        return da.from_array(array, chunks=chunks)
    return array


def image_from_array(
    raw: np.ndarray | da.Array,
    path: str,
    *,
    keep_color: bool,
    notes: list[str] | None = None,
    photometric: str | None = None,
    spacing: tuple[float, float] | None = None,
    modality: str | None = None,
    invert: bool = False,
) -> LoadedImage:
    """Map decoded pixels to float32 [0, 1] per the raster rule, lazily for large images.

    ``invert`` flips the result (TIFF MINISWHITE), after windowing. Data is (H, W), or (H, W, 3) with
    ``keep_color``; dask above the lazy threshold. ReaderError on a bad shape or dtype, or NaN/Inf.
    """
    notes = list(notes or [])
    raw = as_2d(raw, path)
    original_dtype = str(raw.dtype)
    raw = maybe_lazy(raw)
    check_finite(raw, path)
    color = src_color = raw.ndim == 3
    if color:
        if keep_color:
            if raw.shape[-1] == 4:
                raw = raw[..., :3]
                notes.append("alpha channel dropped")
        else:
            raw, note = to_grey(raw)
            notes.append(note)
            color = False
    lo, hi, source, more_notes, original_range = raster_window(raw)
    notes.extend(more_notes)
    data = window_to_unit(raw, lo, hi, invert=invert)
    if invert:
        notes.append("inverted (stored as white-is-zero) so that bright means dense")
    lazy = is_dask(data)
    if not lazy:
        data = np.ascontiguousarray(data)
    meta = ImageMeta(
        source=str(path),
        kind="image",
        shape=tuple(int(s) for s in data.shape),
        spacing=spacing,
        modality=modality,
        photometric=photometric if photometric is not None else ("RGB" if src_color else "MONOCHROME2"),
        original_dtype=original_dtype,
        original_range=(float(original_range[0]), float(original_range[1])),
        window=((lo + hi) / 2.0, hi - lo),
        window_source=source,
        color=color,
        notes=notes,
    )
    return LoadedImage(data=data, meta=meta, lazy=lazy)
