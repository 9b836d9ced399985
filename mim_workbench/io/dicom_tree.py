"""Hospital exports as data sets: patient/study/series trees of DICOM files.

A PACS or CD export is a tree of folders, often with extension-less files named by UID and
sometimes a DICOMDIR index. :func:`dicom_tree` walks it (or reads the DICOMDIR where there is
one), reads each file's header by content, and sorts what it finds:

- images (any object with pixel data) become samples, with PatientID as the patient (used in
  memory only, for patient-level splits) and a unique id from the file's path in the tree;
- DICOM SEG objects become the masks of the images they reference (by SOP Instance UID);
- objects that are not images (structured reports, presentation states, key-object
  selections, …) are skipped and counted;
- a report note says what was found: images per modality and view, sizes, masks.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mim_workbench.errors import ReaderError
from mim_workbench.io import dicom as _dicom
from mim_workbench.io.formats import has_dicom_magic
from mim_workbench.io.samples import Sample

if TYPE_CHECKING:
    from pydicom import Dataset

DICOMDIR = "DICOMDIR"


@dataclass
class TreeScan:
    """What a walk of a DICOM tree found (headers read, no pixels decoded)."""

    images: list[tuple[Path, Dataset]] = field(default_factory=list)   # (file, header)
    segs: list[tuple[Path, Dataset]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)               # kind -> count
    unreadable: list[str] = field(default_factory=list)


def _candidate_files(root: Path) -> list[Path]:
    """Files of the tree: the DICOMDIR's referenced files where there is one, else every file."""
    index = root / DICOMDIR
    if index.is_file():
        try:
            from pydicom import dcmread
            from pydicom.fileset import FileSet

            return sorted({Path(instance.path) for instance in FileSet(dcmread(index))})
        except Exception:  # noqa: BLE001 — a broken index is no reason to give up: walk instead
            pass
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".") and f != DICOMDIR]
    return found


def _kind(ds: Dataset) -> str:
    """"image", "seg", or the kind of a non-image object (its modality, e.g. SR, PR, KO)."""
    if _dicom.is_segmentation(ds):
        return "seg"
    if _dicom.has_pixels(ds):
        return "image"
    return str(ds.get("Modality", "") or _dicom.sop_class_name(ds) or "unknown")


def scan_tree(root: Path) -> TreeScan:
    """Read the header of every DICOM file under ``root`` and sort the files by kind."""
    scan = TreeScan()
    for f in _candidate_files(root):
        if not has_dicom_magic(f) and f.suffix.lower() not in (".dcm", ".dicom"):
            continue
        try:
            ds = _dicom.load(f, header_only=True)
        except ReaderError as exc:
            scan.unreadable.append(f"{f.relative_to(root)} ({exc.problem})")
            continue
        kind = _kind(ds)
        if kind == "image":
            scan.images.append((f, ds))
        elif kind == "seg":
            scan.segs.append((f, ds))
        else:
            scan.skipped[kind] += 1
    return scan


def referenced_instances(seg: Dataset) -> set[str]:
    """SOP Instance UIDs of the images a SEG was drawn on (series and per-frame references)."""
    uids = set()
    for series in seg.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            uids.add(str(item.get("ReferencedSOPInstanceUID", "")))
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.get("ReferencedSOPInstanceUID", "")))
    uids.discard("")
    return uids


def _tree_id(root: Path, f: Path) -> str:
    """The file's path in the tree, folders joined by '_' (names repeat across series)."""
    return "_".join(f.relative_to(root).with_suffix("").parts) if f.suffix.lower() in (".dcm", ".dicom") \
        else "_".join(f.relative_to(root).parts)


def tree_samples(root: Path, scan: TreeScan) -> list[Sample]:
    """Samples of the scanned images, with their SEG masks and PatientIDs."""
    masks: dict[str, Path] = {}
    for seg_path, seg in scan.segs:
        for uid in referenced_instances(seg):
            masks.setdefault(uid, seg_path)
    samples = []
    for f, ds in scan.images:
        pid = str(ds.get("PatientID", "") or "").strip() or None
        samples.append(Sample(id=_tree_id(root, f), image=f, mask=masks.get(str(ds.get("SOPInstanceUID", ""))),
                              patient=pid))
    return samples


def tree_report(scan: TreeScan, samples: list[Sample]) -> str:
    """One line: images per modality and view, the size range, masks, what was skipped."""
    by_kind = Counter((str(ds.get("Modality", "") or "?"), str(ds.get("ViewPosition", "") or "no view"))
                      for _f, ds in scan.images)
    modalities = Counter(m for m, _v in by_kind.elements())
    parts = [f"{m} {n} (" + ", ".join(f"{v} {c}" for (mm, v), c in sorted(by_kind.items()) if mm == m) + ")"
             for m, n in sorted(modalities.items())]
    sizes = [(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _f, ds in scan.images]
    size_text = ""
    if sizes:
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        size_text = f"; sizes {small[0]}×{small[1]} to {large[0]}×{large[1]}"
    n_masks = sum(s.mask is not None for s in samples)
    text = f"DICOM tree: {len(samples)} image(s): {', '.join(parts)}{size_text}; {n_masks} with a SEG mask"
    if scan.skipped:
        text += f"; skipped {sum(scan.skipped.values())} non-image object(s) (" + \
                ", ".join(f"{k} {n}" for k, n in sorted(scan.skipped.items())) + ")"
    if scan.unreadable:
        text += f"; {len(scan.unreadable)} unreadable: " + "; ".join(scan.unreadable[:5])
    return text
