"""DICOM images and binary segmentations (pydicom 3, pylibjpeg codecs).

Pipeline for a greyscale image, in the order the standard defines:

1. Decode the stored values (``ds.pixel_array``; compressed transfer syntaxes go
   through the pylibjpeg / openjpeg / libjpeg plugins pydicom finds).
2. Modality LUT or Rescale Slope/Intercept (:func:`pydicom.pixels.apply_modality_lut`).
   ``original_range`` is the min/max after this step.
3. VOI: a VOI LUT Sequence if present (``window_source="voi_lut"``), else Window
   Center/Width (``"dicom_window"``), both through
   :func:`pydicom.pixels.apply_voi_lut`, then scaled by the VOI output range to [0, 1].
   Fallback (``"percentile"``): the 0.5-99.5 % percentiles of the rescaled pixels.
   The fallback is also used, with a note, when the header window covers less
   than 1 % of the pixels (e.g. a window written for another offset), because it
   would otherwise produce a flat white or black image.
4. MONOCHROME1 is inverted after windowing so bone is bright in every image.
   Presentation LUT Shape INVERSE inverts a MONOCHROME2 image; on MONOCHROME1
   (where DX requires it) it names the same inversion and is not applied twice.

Spacing: ``PixelSpacing``, else ``ImagerPixelSpacing`` (detector plane, not
corrected for magnification; noted). Zero or malformed values are ignored with a note.

A segmentation (Modality SEG) is a region mask, not an image: frames of one
plane are merged (union of segments); FRACTIONAL values count above half the
maximum. Multi-frame images and SEGs spanning several planes are refused:
2-D is expected everywhere in the workbench.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mim_workbench.errors import ReaderError
from mim_workbench.io import meta as _meta
from mim_workbench.io.arrays import DASK_CHUNK, image_from_array, shape_str
from mim_workbench.io.meta import ImageMeta, LoadedImage
from mim_workbench.io.normalize import percentile_window, window_to_unit
from mim_workbench.io.raster import one_line

if TYPE_CHECKING:
    from pydicom import Dataset

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: A header window covering fewer pixels than this fraction is treated as unusable.
MIN_WINDOW_COVERAGE = 0.01


def load(path: str | Path, *, header_only: bool = False) -> Dataset:
    """Read a DICOM data set (``force`` for files without preamble); ReaderError when it is not one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise ReaderError(path, f"not a DICOM file ({one_line(exc)})") from None
    except Exception as exc:
        raise ReaderError(path, f"unreadable or truncated DICOM file ({one_line(exc)})") from None
    if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows", *_PIXEL_TAGS)) and "TransferSyntaxUID" not in ds.file_meta:
        raise ReaderError(path, "not a DICOM file (no DICOM header found)")
    for w in caught:
        text = str(w.message)
        if "end of file" in text.lower() or "truncat" in text.lower():
            raise ReaderError(path, "truncated DICOM file (end of file reached inside the data set)")
    if "TransferSyntaxUID" not in ds.file_meta:
        _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds: Dataset) -> None:
    """A bare data set (no file meta) is uncompressed; record the encoding pydicom detected."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = uid


def sop_class_name(ds: Dataset) -> str:
    """The SOP class's name (its UID when pydicom does not know it; "unknown" when the header has none)."""
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if uid is None:
        return "unknown"
    name = getattr(uid, "name", str(uid))
    return name if name and name != str(uid) else str(uid)


def is_segmentation(ds: Dataset) -> bool:
    """True for a DICOM SEG: Modality SEG or the Segmentation Storage SOP class."""
    uid = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return str(ds.get("Modality", "")).upper() == "SEG" or uid == SEG_SOP_CLASS


def has_pixels(ds: Dataset) -> bool:
    """True when the header announces pixel data (works on header-only reads too)."""
    if any(k in ds for k in _PIXEL_TAGS):
        return True
    return "Rows" in ds and "Columns" in ds and "BitsAllocated" in ds


def require_pixels(ds: Dataset, path: str | Path) -> None:
    """ReaderError for objects without pixels (SR, ...) or images whose pixels are missing."""
    if any(k in ds for k in _PIXEL_TAGS):
        return
    if ("Rows" in ds and "Columns" in ds) or "Image Storage" in sop_class_name(ds):
        raise ReaderError(path, f"image header ({sop_class_name(ds)}) but no pixel data; the file is probably truncated")
    raise ReaderError(path, f"not an image (SOP class {sop_class_name(ds)}; no pixel data)")


def n_frames(ds: Dataset) -> int:
    """NumberOfFrames; 1 when absent, empty or malformed."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _decode_error(ds: Dataset, path: str | Path, exc: BaseException) -> ReaderError:
    """One clear line for a pixel-decoding failure, naming the transfer syntax and decoder."""
    tsuid = ds.file_meta.get("TransferSyntaxUID")
    if tsuid is None:
        return ReaderError(path, f"cannot decode pixel data: no transfer syntax in file meta ({one_line(exc)})")
    text = str(exc).lower()
    try:
        compressed = tsuid.is_compressed
    except ValueError:  # a corrupt header: the UID is not a transfer syntax at all
        return ReaderError(path, f"cannot decode pixel data: invalid transfer syntax UID {str(tsuid)[:64]!r}")
    if not compressed or "less than expected" in text or "truncat" in text:
        return ReaderError(path, f"pixel data truncated or inconsistent with the header ({one_line(exc, 120)})")
    label = f"transfer syntax '{tsuid.name}' ({tsuid})"
    try:
        from pydicom.pixels.decoders.base import get_decoder

        decoder = get_decoder(tsuid)
    except Exception:
        return ReaderError(path, f"cannot decode pixel data: pydicom has no decoder for {label}")
    missing = "; ".join(m.replace(" - requires ", " (requires ") + ")" for m in decoder.missing_dependencies)
    if not decoder.is_available:
        return ReaderError(path, f"cannot decode pixel data in {label}: no decoder installed; missing {missing or 'a decoder plugin'}")
    tried = ", ".join(decoder.available_plugins)
    hint = f"; a missing decoder may handle it: {missing}" if missing else ""
    return ReaderError(path, f"cannot decode pixel data in {label}: the installed decoder(s) ({tried}) failed{hint}")


def decode(ds: Dataset, path: str | Path) -> np.ndarray:
    """``ds.pixel_array`` with failures turned into one-line ReaderErrors."""
    try:
        return ds.pixel_array
    except ReaderError:
        raise
    except Exception as exc:
        raise _decode_error(ds, path, exc) from None


def spacing_of(ds: Dataset) -> tuple[tuple[float, float] | None, list[str]]:
    """(row, col) spacing in mm from PixelSpacing, else ImagerPixelSpacing."""
    notes: list[str] = []
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag not in ds:
            continue
        try:
            value = [float(v) for v in ds[tag].value]
        except (TypeError, ValueError):
            notes.append(f"{tag} is malformed ({ds[tag].value!r}); ignored")
            continue
        if len(value) != 2 or not all(np.isfinite(v) and v > 0 for v in value):
            notes.append(f"{tag} {value} is not a positive pair; ignored")
            continue
        if tag == "ImagerPixelSpacing":
            notes.append("spacing from ImagerPixelSpacing (detector plane; not corrected for magnification)")
        return (value[0], value[1]), notes
    return None, notes


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _voi_range(ds: Dataset, probe: np.ndarray) -> tuple[float, float]:
    """Output range of the data set's VOI transform (pydicom scales to the stored bit range)."""
    from pydicom.pixels import apply_voi_lut

    with np.errstate(over="ignore", invalid="ignore"):
        out = apply_voi_lut(probe, ds, index=0)
    out = np.asarray(out, dtype=np.float64)
    return float(np.nanmin(out)), float(np.nanmax(out))


def _window_count(ds: Dataset) -> int:
    value = ds.WindowCenter
    return 1 if isinstance(value, (str, int, float)) or not hasattr(value, "__len__") else len(value)


def _voi_plan(
    ds: Dataset, rescaled: np.ndarray, notes: list[str]
) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[float, float] | None, str]:
    """Pick the VOI step; returns (block -> float32 [0, 1], window, window_source)."""
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    if seq:
        try:
            n, first, _bits = (int(v) for v in seq[0].LUTDescriptor)
            n = n or 65536
            lo, hi = _voi_range(ds, np.arange(first, first + n, dtype=np.float64))
        except Exception as exc:  # malformed LUT: fall through to window / percentile
            notes.append(f"VOI LUT unusable ({one_line(exc, 80)}); ignored")
        else:
            if hi > lo:
                if len(seq) > 1:
                    notes.append(f"{len(seq)} VOI LUTs in header; used the first")

                def voi_lut(block: np.ndarray) -> np.ndarray:
                    """Rescaled values through the first VOI LUT, to float [0, 1]."""
                    return window_to_unit(apply_voi_lut(block, ds, index=0, prefer_lut=True), lo, hi)

                return voi_lut, (first + n / 2.0, float(n)), "voi_lut"
            notes.append("VOI LUT is constant; ignored")

    reason = "no VOI LUT or window in header"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = float("nan")
        if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
            reason = "header window is malformed"
        else:
            lo_in, hi_in = center - width / 2.0, center + width / 2.0
            step_r, step_c = max(1, rescaled.shape[0] // 512), max(1, rescaled.shape[1] // 512)
            sample = rescaled[::step_r, ::step_c]
            coverage = float(((sample >= lo_in) & (sample <= hi_in)).mean())
            if coverage >= MIN_WINDOW_COVERAGE:
                # pydicom scales the window output to the stored bit range; probe its ends.
                lo, hi = _voi_range(ds, np.array([lo_in - 1e9, hi_in + 1e9], dtype=np.float64))
                if _window_count(ds) > 1:
                    notes.append(f"{_window_count(ds)} windows in header; used the first")

                def dicom_window(block: np.ndarray) -> np.ndarray:
                    """Rescaled values through the first header window, to float [0, 1]."""
                    return window_to_unit(apply_voi_lut(block, ds, index=0, prefer_lut=False), lo, hi)

                return dicom_window, (center, width), "dicom_window"
            reason = (
                f"header window (center {center:g}, width {width:g}) covers {coverage * 100:.2g} % of the pixels "
                f"(range {sample.min():g}..{sample.max():g})"
            )
    lo, hi = percentile_window(rescaled)
    notes.append(f"{reason}; used the 0.5-99.5 % percentile window")
    if hi <= lo:
        notes.append("constant image; returned as zeros")

    def percentile(block: np.ndarray) -> np.ndarray:
        """Rescaled values through the 0.5-99.5 % percentile window, to float [0, 1]."""
        return window_to_unit(block, lo, hi)

    return percentile, ((lo + hi) / 2.0, hi - lo), "percentile"


def read_dicom_image(path: str | Path, *, keep_color: bool = False, ds: Dataset | None = None,
                     notes: list[str] | None = None) -> LoadedImage:
    """Read one DICOM image as float32 [0, 1] (see module docstring for the pipeline).

    ``ds``: its header and pixels when already loaded.  ``notes`` start the image's notes.
    Returns a 2-D grey image (or ``[H, W, 3]`` colour when ``keep_color``), as a lazy dask
    array when large.  Raises :class:`ReaderError` naming ``path`` for a segmentation, a
    file without pixels, a multi-frame image, or pixels or a rescale that cannot be used.
    """
    notes = list(notes or [])
    ds = ds if ds is not None else load(path)
    spp = _single_frame_samples(ds, path)
    modality = str(ds.get("Modality", "")) or None
    photometric = str(ds.get("PhotometricInterpretation", "")) or None
    spacing, spacing_notes = spacing_of(ds)
    notes.extend(spacing_notes)
    raw = decode(ds, path)
    if raw.ndim != (3 if spp > 1 else 2):
        raise ReaderError(path, f"unexpected DICOM pixel array of shape {shape_str(raw.shape)}; expected one 2-D image")
    if spp > 1:
        # pydicom converts YBR to RGB; treat like any colour raster.
        return image_from_array(raw, str(path), keep_color=keep_color, notes=notes,
                                photometric=photometric, spacing=spacing, modality=modality)
    rescaled = _rescaled(raw, ds, path)
    original_range = (float(rescaled.min()), float(rescaled.max()))
    to_unit, window, source = _voi_plan(ds, rescaled, notes)
    invert = _inverted(ds, photometric, notes)

    def pipeline(block: np.ndarray) -> np.ndarray:
        """Rescaled values to float32 [0, 1], VOI then inversion; applied per dask block when lazy."""
        out = to_unit(block)
        return (np.float32(1.0) - out).astype(np.float32) if invert else out.astype(np.float32)

    lazy = _meta.is_large(rescaled.shape)
    if lazy:
        import dask.array as da

        data = da.from_array(rescaled, chunks=(DASK_CHUNK, DASK_CHUNK)).map_blocks(pipeline, dtype=np.float32)
    else:
        data = np.ascontiguousarray(pipeline(rescaled))
    meta = ImageMeta(
        source=str(path), kind="image", shape=tuple(int(s) for s in data.shape), spacing=spacing,
        modality=modality, photometric=photometric, original_dtype=str(raw.dtype),
        original_range=original_range, window=(float(window[0]), float(window[1])) if window else None,
        window_source=source, color=False, notes=notes,
    )
    return LoadedImage(data=data, meta=meta, lazy=lazy)


def _single_frame_samples(ds: Dataset, path: str | Path) -> int:
    """Samples per pixel of a single-frame image; raises ReaderError for anything else."""
    if is_segmentation(ds):
        raise ReaderError(path, "is a DICOM segmentation (SEG), not an image; open it as a mask")
    require_pixels(ds, path)
    frames = n_frames(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        shape = (frames, rows, cols) + ((spp,) if spp > 1 else ())
        raise ReaderError(path, f"multi-frame DICOM of shape {shape_str(shape)}; expected one 2-D image")
    return spp


def _rescaled(raw: np.ndarray, ds: Dataset, path: str | Path) -> np.ndarray:
    """Stored values through the modality LUT / rescale; raises ReaderError when unusable or not finite."""
    from pydicom.pixels import apply_modality_lut

    try:
        rescaled = apply_modality_lut(raw, ds)
    except Exception as exc:
        raise ReaderError(path, f"invalid modality LUT / rescale ({one_line(exc)})") from None
    rescaled = np.asarray(rescaled)
    if rescaled.dtype.kind == "f" and not np.isfinite(rescaled).all():
        raise ReaderError(path, "rescaled pixels contain NaN/Inf")
    return rescaled


def _inverted(ds: Dataset, photometric: str | None, notes: list[str]) -> bool:
    """Whether grey values must be inverted so that bright means dense (a note says why)."""
    if photometric == "MONOCHROME1":
        notes.append("MONOCHROME1 inverted so that bright means dense")
        return True
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        # For MONOCHROME1 the standard requires INVERSE: it describes the same
        # inversion, so it must not be applied twice.
        notes.append("Presentation LUT Shape INVERSE applied")
        return True
    return False


def _frame_positions(ds: Dataset) -> list[tuple[float, ...]]:
    positions = []
    for item in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        plane = item.get("PlanePositionSequence")
        if plane and "ImagePositionPatient" in plane[0]:
            positions.append(tuple(round(float(v), 3) for v in plane[0].ImagePositionPatient))
    return positions


def seg_mask(ds: Dataset, path: str | Path) -> np.ndarray:
    """A SEG data set as one (H, W) uint8 {0, 1} region (union of its segments)."""
    require_pixels(ds, path)
    raw = np.asarray(decode(ds, path))
    if raw.ndim == 2:
        raw = raw[None]
    if raw.ndim != 3:
        raise ReaderError(path, f"unexpected segmentation pixel array of shape {shape_str(raw.shape)}")
    distinct = set(_frame_positions(ds))
    if raw.shape[0] > 1 and len(distinct) > 1:
        raise ReaderError(
            path, f"3-D segmentation: {raw.shape[0]} frames at {len(distinct)} positions (shape {shape_str(raw.shape)}); expected 2-D"
        )
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    if seg_type == "FRACTIONAL":
        top = float(ds.get("MaximumFractionalValue", raw.max() or 1) or 1)
        frames = raw > top / 2.0
    else:
        frames = raw != 0
    return frames.any(axis=0).astype(np.uint8)


def seg_image(path: str | Path, ds: Dataset) -> LoadedImage:
    """A SEG as a LoadedImage of kind "mask" (for read_path / the napari reader)."""
    mask = seg_mask(ds, path)
    spacing, notes = spacing_of(ds)
    if spacing is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        try:
            measures = shared[0].PixelMeasuresSequence[0] if shared else None
            if measures is not None and "PixelSpacing" in measures:
                spacing = (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1]))
        except (AttributeError, IndexError, TypeError, ValueError):
            pass
    notes.append(f"DICOM segmentation ({str(ds.get('SegmentationType', 'BINARY'))}); segments merged into one region")
    meta = ImageMeta(
        source=str(path), kind="mask", shape=tuple(mask.shape), spacing=spacing, modality="SEG",
        photometric=str(ds.get("PhotometricInterpretation", "")) or None, original_dtype="uint8",
        original_range=(float(mask.min()), float(mask.max())), window=None, window_source="dtype_range",
        color=False, notes=notes,
    )
    return LoadedImage(data=mask, meta=meta, lazy=False)


def dicom_raw_mask(path: str | Path, ds: Dataset) -> np.ndarray:
    """Stored values of a non-SEG DICOM used as a mask (value rule applied by the caller)."""
    require_pixels(ds, path)
    if n_frames(ds) > 1:
        raise ReaderError(path, f"multi-frame DICOM ({n_frames(ds)} frames); expected one 2-D mask")
    return np.asarray(decode(ds, path))


def instance_number(ds: Dataset) -> int | None:
    """InstanceNumber; None when absent, empty or malformed."""
    try:
        value = ds.get("InstanceNumber")
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
