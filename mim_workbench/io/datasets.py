"""Finding samples on disk (:func:`discover`) and splitting them by patient.

Layouts :func:`discover` understands, tried in this order:

``manifest``
    a CSV (or TSV) file with columns ``image`` (required), ``mask``, ``label``,
    ``patient`` and optionally ``id``; paths relative to the CSV's folder.
``images_masks``
    a folder with ``images/`` and mask files matched by file stem (``<stem>`` or
    ``<stem>_mask``). The mask folder is ``masks=`` when given, else a sub-folder
    named ``mask*`` or ``*_masks``; when several exist the one matching the most
    image stems wins (ties: alphabetical) and a note names the choice.
``class_folders``
    the COVID-19 Radiography Database layout ``<class>/images`` (+ ``<class>/masks``),
    or plain ``<class>/*.png``; the label is the folder name and ids are
    ``<class>/<stem>`` so they stay unique across classes.
``image_folder``
    a plain folder of images (mask folders are looked for as above). DICOM files
    that are segmentations or have no pixels are skipped with a note.

A ``labels.csv`` next to ``images/`` (or in a plain folder) adds labels and
patients: id column ``id`` / ``image`` / ``filename``, label column ``label``,
patient column ``patient`` / ``patientid`` (case, ``_`` and spaces ignored).
Without a patient column, DICOM ``PatientID`` is used when present, and mini-MIAS
ids (``mdbNNN``) get patient ``ceil(N / 2)`` because consecutive images
mdb(2k-1), mdb(2k) are the two breasts of one woman.

Patients matter because splits must never put one patient's images on both
sides (:func:`patient_split`).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim_workbench.errors import ConfigError, DatasetError, ReaderError
from mim_workbench.io.dicom_tree import DICOMDIR, scan_tree, tree_report, tree_samples
from mim_workbench.io.formats import IMAGE_EXTENSIONS, sniff
from mim_workbench.io.readers import list_image_files
from mim_workbench.io.samples import Sample

MANIFEST_SUFFIXES = (".csv", ".tsv")
_MASK_DIR = re.compile(r"^masks?($|[_\-. ].*)|.*[_\-]masks?$", re.IGNORECASE)
_MASK_SUFFIXES = ("_mask", "-mask", "_seg", "_label")
_MIAS_ID = re.compile(r"^mdb(\d{3})$")

_ID_COLUMNS = ("id", "image", "filename", "file", "path")
_PATIENT_COLUMNS = ("patient", "patientid")


@dataclass
class DatasetIndex:
    """What :func:`discover` found: samples plus notes explaining every guess it made."""

    root: Path
    kind: str
    samples: list[Sample]
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_masks(self) -> int:
        """Number of samples that have a mask file."""
        return sum(s.mask is not None for s in self.samples)

    def summary(self) -> dict:
        """Counts for CLI/GUI display (JSON-serialisable)."""
        labels = Counter(s.label for s in self.samples if s.label is not None)
        patients = {s.patient for s in self.samples if s.patient is not None}
        return {
            "root": str(self.root), "kind": self.kind, "images": len(self.samples), "masks": self.n_masks,
            "classes": dict(sorted(labels.items())), "patients": len(patients), "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- helpers

def file_stem(p: Path) -> str:
    """Name without a known image extension (UID-named DICOM files keep their dots)."""
    return p.stem if p.suffix.lower() in IMAGE_EXTENSIONS else p.name


def _norm_col(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.strip().lower())


def _find_col(fieldnames: Sequence[str], candidates: Sequence[str]) -> str | None:
    by_norm = {_norm_col(f): f for f in fieldnames if f is not None}
    for c in candidates:
        if c in by_norm:
            return by_norm[c]
    return None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc})") from None


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _image_files(folder: Path, notes: list[str]) -> tuple[list[Path], dict[Path, Any]]:
    """Image files in ``folder``; DICOM SEG / pixel-less objects skipped with a note.

    Also returns DICOM headers read on the way (for PatientID).
    """
    from mim_workbench.io import dicom as _dicom

    files, headers, skipped = [], {}, []
    for f in list_image_files(folder):
        if f.is_file():
            try:
                fmt = sniff(f)[0]
            except ReaderError as exc:
                skipped.append(f"{f.name} ({exc.problem})")
                continue
            if fmt == "dicom":
                try:
                    ds = _dicom.load(f, header_only=True)
                except ReaderError as exc:
                    skipped.append(f"{f.name} ({exc.problem})")
                    continue
                if _dicom.is_segmentation(ds):
                    skipped.append(f"{f.name} (DICOM segmentation)")
                    continue
                if not _dicom.has_pixels(ds):
                    skipped.append(f"{f.name} (not an image: {_dicom.sop_class_name(ds)})")
                    continue
                headers[f] = ds
        files.append(f)
    if skipped:
        notes.append(f"{folder.name}: skipped {len(skipped)} file(s): " + "; ".join(skipped))
    return files, headers


def _mask_index(folder: Path) -> dict[str, Path]:
    """stem -> mask path, accepting ``<stem>_mask`` style names too."""
    index: dict[str, Path] = {}
    for f in list_image_files(folder):
        stem = file_stem(f)
        index.setdefault(stem, f)
        for suffix in _MASK_SUFFIXES:
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                index.setdefault(stem[: -len(suffix)], f)
    return index


def _choose_masks(root: Path, stems: set[str], masks: str | os.PathLike | None, notes: list[str],
                  exclude: Path | None = None) -> dict[str, Path]:
    """The mask index to use (explicit or best-matching candidate folder)."""
    if masks is not None:
        mdir = Path(masks)
        if not mdir.is_absolute() and not mdir.exists():
            mdir = root / mdir
        if not mdir.is_dir():
            raise DatasetError(f"{mdir}: mask folder not found")
        index = _mask_index(mdir)
        hits = len(stems & index.keys())
        if hits == 0:
            notes.append(f"mask folder {mdir} matches no image stems")
        return index
    candidates = [d for d in sorted(root.iterdir(), key=lambda q: q.name)
                  if d.is_dir() and d != exclude and _MASK_DIR.match(d.name)]
    if not candidates:
        return {}
    scored = []
    for d in candidates:
        index = _mask_index(d)
        scored.append((len(stems & index.keys()), d, index))
    scored.sort(key=lambda t: (-t[0], t[1].name))
    best_hits, best_dir, best_index = scored[0]
    if best_hits == 0:
        notes.append("mask folder(s) " + ", ".join(d.name for _, d, _ in scored) + " match no image stems; no masks used")
        return {}
    if len(scored) > 1:
        listing = ", ".join(f"{d.name} ({n} matches)" for n, d, _ in scored)
        notes.append(f"several mask folders: {listing}; using {best_dir.name} (pass masks= to choose another)")
    return best_index


def _apply_labels_csv(csv_path: Path, samples: list[Sample], notes: list[str]) -> bool:
    """Fill label/patient from labels.csv; returns True when it had a patient column."""
    fieldnames, rows = _read_csv(csv_path)
    id_col = _find_col(fieldnames, _ID_COLUMNS)
    if id_col is None:
        notes.append(f"{csv_path.name}: no id/image/filename column; ignored")
        return False
    label_col = _find_col(fieldnames, ("label",))
    patient_col = _find_col(fieldnames, _PATIENT_COLUMNS)
    if label_col is None:
        notes.append(f"{csv_path.name}: no label column; samples are unlabelled")
    by_id: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    repeated = 0
    for line, row in enumerate(rows, start=2):
        key = _clean(row.get(id_col))
        if key is None:
            continue
        stem = file_stem(Path(key))
        if stem in by_id:
            # A repeated id must not silently pick one of two labels (or patients).
            cols = [c for c in (label_col, patient_col) if c is not None]
            if any(_clean(by_id[stem].get(c)) != _clean(row.get(c)) for c in cols):
                raise DatasetError(f"{csv_path}:{line}: id {key!r} repeats line {first_line[stem]} "
                                   "with a different label or patient; keep one row per image")
            repeated += 1
            continue
        by_id[stem], first_line[stem] = row, line
    if repeated:
        notes.append(f"{csv_path.name}: {repeated} repeated row(s) with the same values ignored")
    missing = 0
    for s in samples:
        row = by_id.pop(file_stem(s.image), None) or by_id.pop(s.id, None)
        if row is None:
            missing += 1
            continue
        if label_col is not None:
            s.label = _clean(row.get(label_col))
        if patient_col is not None:
            s.patient = _clean(row.get(patient_col))
    if missing:
        notes.append(f"{csv_path.name}: {missing} image(s) have no row")
    if by_id:
        notes.append(f"{csv_path.name}: {len(by_id)} row(s) match no image file")
    return patient_col is not None


def _fill_patients(samples: list[Sample], headers: dict[Path, Any], notes: list[str]) -> None:
    """Patients when no column gave them: DICOM PatientID, the mini-MIAS pairing rule."""
    if any(s.patient is not None for s in samples):
        return
    from_dicom = 0
    for s in samples:
        ds = headers.get(s.image)
        pid = _clean(ds.get("PatientID")) if ds is not None else None
        if pid:
            s.patient, from_dicom = pid, from_dicom + 1
    if from_dicom:
        notes.append(f"patients from DICOM PatientID for {from_dicom} image(s)")
        return
    if samples and all(_MIAS_ID.match(s.id) for s in samples):
        for s in samples:
            n = int(_MIAS_ID.match(s.id).group(1))  # type: ignore[union-attr]
            s.patient = str(math.ceil(n / 2))
        notes.append("mini-MIAS ids: consecutive images mdb(2k-1), mdb(2k) assigned to patient k")
        return
    notes.append("no patient ids: each image counts as its own patient when splitting")


def _classes(samples: Sequence[Sample]) -> list[str]:
    return sorted({s.label for s in samples if s.label is not None})


def _unique_ids(files: list[Path], notes: list[str], prefix: str = "") -> list[str]:
    """Ids from file stems; the full name where two files share a stem (a.png, a.dcm)."""
    stems = [file_stem(f) for f in files]
    counts = Counter(stems)
    if any(c > 1 for c in counts.values()):
        notes.append("some images share a stem; their ids include the extension")
    return [prefix + (s if counts[s] == 1 else f.name) for s, f in zip(stems, files)]


# --------------------------------------------------------------------------- layouts

def _folder(root: Path, image_dir: Path, masks: str | os.PathLike | None, kind: str) -> DatasetIndex:
    notes: list[str] = []
    files, headers = _image_files(image_dir, notes)
    if not files:
        raise DatasetError(f"{image_dir}: no image files found")
    ids = _unique_ids(files, notes)
    mask_index = _choose_masks(root, {file_stem(f) for f in files}, masks, notes,
                               exclude=image_dir if image_dir != root else None)
    samples = [Sample(id=i, image=f, mask=mask_index.get(file_stem(f))) for i, f in zip(ids, files)]
    # A file listed as both image and mask (plain folder whose masks sit beside it) is not an image.
    mask_paths = set(mask_index.values())
    samples = [s for s in samples if s.image not in mask_paths]
    has_patient_col = False
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        has_patient_col = _apply_labels_csv(labels_csv, samples, notes)
    if not has_patient_col:
        _fill_patients(samples, headers, notes)
    return DatasetIndex(root=root, kind=kind, samples=samples, classes=_classes(samples), notes=notes)


def _class_dirs(root: Path) -> list[tuple[str, Path, Path]]:
    """(class, class folder, image folder) for the class-folder layout."""
    found = []
    for d in sorted((q for q in root.iterdir() if q.is_dir() and not q.name.startswith(".")), key=lambda q: q.name):
        if _MASK_DIR.match(d.name):
            continue
        if (d / "images").is_dir():
            found.append((d.name, d, d / "images"))
        elif list_image_files(d):
            found.append((d.name, d, d))
    return found


def _class_folders(root: Path, classes: list[tuple[str, Path, Path]],
                   masks: str | os.PathLike | None) -> DatasetIndex:
    notes: list[str] = []
    samples: list[Sample] = []
    all_headers: dict[Path, Any] = {}
    for name, cdir, idir in classes:
        files, headers = _image_files(idir, notes)
        all_headers.update(headers)
        mask_dir = Path(masks) / name if masks is not None else None
        if mask_dir is not None and not mask_dir.is_dir():
            mask_dir = None
        mask_index = _choose_masks(cdir, {file_stem(f) for f in files}, mask_dir, notes,
                                   exclude=idir if idir != cdir else None)
        ids = _unique_ids(files, notes, prefix=f"{name}/")
        mask_paths = set(mask_index.values())
        for i, f in zip(ids, files):
            if f in mask_paths:
                continue
            samples.append(Sample(id=i, image=f, mask=mask_index.get(file_stem(f)), label=name))
    if not samples:
        raise DatasetError(f"{root}: class folders hold no images")
    if len(classes) == 1:
        notes.append(f"only one class folder ({classes[0][0]}/); every image is labelled {classes[0][0]!r}")
    _fill_patients(samples, all_headers, notes)
    return DatasetIndex(root=root, kind="class_folders", samples=samples, classes=_classes(samples), notes=notes)


def _manifest(path: Path) -> DatasetIndex:
    notes: list[str] = []
    base = path.parent
    fieldnames, rows = _read_csv(path)
    image_col = _find_col(fieldnames, ("image", "imagepath", "path", "file", "filename"))
    if image_col is None:
        raise DatasetError(f"{path}: manifest needs an 'image' column (found: {', '.join(fieldnames) or 'none'})")
    mask_col = _find_col(fieldnames, ("mask", "maskpath", "region"))
    label_col = _find_col(fieldnames, ("label",))
    patient_col = _find_col(fieldnames, _PATIENT_COLUMNS)
    id_col = _find_col(fieldnames, ("id",))
    samples: list[Sample] = []
    for line, row in enumerate(rows, start=2):
        rel = _clean(row.get(image_col))
        if rel is None:
            raise DatasetError(f"{path}:{line}: empty image path")
        image = Path(rel) if Path(rel).is_absolute() else base / rel
        if not image.exists():
            raise DatasetError(f"{path}:{line}: image not found: {image}")
        mask = None
        mrel = _clean(row.get(mask_col)) if mask_col else None
        if mrel is not None:
            mask = Path(mrel) if Path(mrel).is_absolute() else base / mrel
            if not mask.exists():
                raise DatasetError(f"{path}:{line}: mask not found: {mask}")
        sid = _clean(row.get(id_col)) if id_col else None
        samples.append(Sample(
            id=sid or "", image=image, mask=mask,
            label=_clean(row.get(label_col)) if label_col else None,
            patient=_clean(row.get(patient_col)) if patient_col else None,
        ))
    if not samples:
        raise DatasetError(f"{path}: manifest has no rows")
    if id_col is None:
        stems = Counter(file_stem(s.image) for s in samples)
        for s in samples:
            stem = file_stem(s.image)
            s.id = stem if stems[stem] == 1 else os.path.relpath(s.image, base)
    dupes = [k for k, n in Counter(s.id for s in samples).items() if n > 1]
    if dupes:
        raise DatasetError(f"{path}: duplicate ids, e.g. {dupes[0]!r}")
    if patient_col is None:
        _fill_patients(samples, {}, notes)
    return DatasetIndex(root=base, kind="manifest", samples=samples, classes=_classes(samples), notes=notes)


def discover(path: str | os.PathLike, masks: str | os.PathLike | None = None) -> DatasetIndex:
    """Index a dataset folder or CSV manifest (layouts in the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: not found")
    if p.is_file():
        if p.suffix.lower() in MANIFEST_SUFFIXES:
            return _manifest(p)
        raise DatasetError(f"{p}: not a dataset folder or CSV manifest")
    try:
        if (p / DICOMDIR).is_file():
            return _dicom_tree(p, masks) or _no_images(p)
        if (p / "images").is_dir():
            return _folder(p, p / "images", masks, "images_masks")
        if list_image_files(p):
            return _folder(p, p, masks, "image_folder")
        classes = _class_dirs(p)
        if classes:
            return _class_folders(p, classes, masks)
        tree = _dicom_tree(p, masks)
        if tree is not None:
            return tree
    except ReaderError as exc:
        raise DatasetError(str(exc)) from None
    return _no_images(p)


def _no_images(p: Path) -> DatasetIndex:
    raise DatasetError(f"{p}: no images found (expected images/, <class>/images/, image files, a tree of "
                       "DICOM files or a CSV manifest)")


def _dicom_tree(root: Path, masks: str | os.PathLike | None) -> DatasetIndex | None:
    """A patient/study/series tree of DICOM files (see :mod:`mim_workbench.io.dicom_tree`)."""
    scan = scan_tree(root)
    if not scan.images:
        return None
    samples = tree_samples(root, scan)
    if masks is not None:
        index = _mask_index(Path(masks))
        for s in samples:
            s.mask = index.get(s.id) or index.get(file_stem(s.image)) or s.mask
    notes = [tree_report(scan, samples)]
    n_patients = sum(s.patient is not None for s in samples)
    notes.append(f"patients from DICOM PatientID for {n_patients} image(s)" if n_patients
                 else "no patient ids: each image counts as its own patient when splitting")
    if (root / "labels.csv").is_file():
        _apply_labels_csv(root / "labels.csv", samples, notes)
    return DatasetIndex(root=root, kind="dicom_tree", samples=samples, classes=_classes(samples), notes=notes)


# --------------------------------------------------------------------------- splitting

def patient_split(samples: Sequence[Sample], *, val: float = 0.1, test: float = 0.0,
                  seed: int = 0) -> dict[str, list[Sample]]:
    """Split into "train"/"val"/"test" with no patient in two splits.

    Deterministic for a given seed and sample set (independent of input order).
    Samples without a patient id are their own patient. Patients are grouped by
    their majority label and each label is split in proportion (best effort:
    whole patients move, so fractions are approximate). When ``val`` (``test``)
    is positive and there are enough patients, that split gets at least one.
    Within each split samples keep their input order.
    """
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"{name} fraction must be in [0, 1), got {frac}")
    if val + test >= 1.0:
        raise ConfigError(f"val + test must be below 1, got {val + test}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        # Samples without a patient are their own group (duplicate ids, if any, stay together).
        key = f"p:{s.patient}" if s.patient is not None else f"s:{s.id}"
        groups[key].append(i)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    order = [keys[j] for j in rng.permutation(len(keys))]

    def majority(key: str) -> str:
        """The most frequent label of group ``key`` ("" for unlabelled; ties: alphabetically first)."""
        labels = Counter(samples[i].label or "" for i in groups[key])
        return sorted(labels.items(), key=lambda t: (-t[1], t[0]))[0][0]

    strata: dict[str, list[str]] = defaultdict(list)
    for key in order:
        strata[majority(key)].append(key)
    assign: dict[str, str] = {}
    for label in sorted(strata):
        total = sum(len(groups[k]) for k in strata[label])
        want = {"test": test * total, "val": val * total}
        have = {"test": 0, "val": 0}
        for key in strata[label]:
            size = len(groups[key])
            target = next((sp for sp in ("test", "val") if want[sp] - have[sp] >= size / 2.0), "train")
            assign[key] = target
            if target != "train":
                have[target] += size
    _ensure_nonempty(assign, order, groups, val, test, len(samples))
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    split_of = {i: assign[k] for k, idx in groups.items() for i in idx}
    for i, s in enumerate(samples):
        out[split_of[i]].append(s)
    return out


def _ensure_nonempty(assign: dict[str, str], order: list[str], groups: dict[str, list[int]],
                     val: float, test: float, n: int) -> None:
    """Top up val/test toward their global targets by moving whole train patients."""
    for split, frac in (("test", test), ("val", val)):
        if frac <= 0:
            continue
        target = max(1, round(frac * n))
        have = sum(len(groups[k]) for k, v in assign.items() if v == split)
        for key in order:
            if have >= target:
                break
            size = len(groups[key])
            n_train_groups = sum(1 for v in assign.values() if v == "train")
            if assign[key] != "train" or n_train_groups <= 1:
                continue
            if have > 0 and have + size - target > target - have:
                continue  # moving it would overshoot more than it helps
            assign[key] = split
            have += size


def table_columns(data: str | os.PathLike, samples: Sequence[Sample]) -> dict[str, list[str | None]]:
    """Every column of a data set's table for ``samples``, in their order: the manifest when
    ``data`` is one, else ``labels.csv`` in the folder (rows matched by id or file stem); empty
    when there is none.  The id/image column itself is left out."""
    path = Path(data)
    table = path if path.is_file() else path / "labels.csv"
    if not table.is_file() or table.suffix.lower() not in MANIFEST_SUFFIXES:
        return {}
    fieldnames, rows = _read_csv(table)
    id_col = _find_col(fieldnames, _ID_COLUMNS)
    if id_col is None:
        return {}
    by_key = {file_stem(Path(r[id_col])): r for r in rows if _clean(r.get(id_col))}
    matched = [by_key.get(file_stem(s.image)) or by_key.get(s.id) or {} for s in samples]
    return {col: [_clean(r.get(col)) for r in matched] for col in fieldnames if col and col != id_col}
