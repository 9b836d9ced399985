"""The three sets of a study, checked and separated before anything trains.

The labelled set is split once by patient (``io.datasets.patient_split``).  No labelled test
image is pretrained on: when the pool shares files with the labelled set (the same path,
or a copy with the same bytes), those pool images are excluded from pretraining.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, MimError
from ..io.samples import Sample
from .config import StudyConfig


@dataclass
class StudyData:
    classes: list[str]
    splits: dict[str, list[Sample]]          # "train" / "val" / "test" of the labelled set
    pool: str                                # what pretraining reads
    pool_ids: list[str]                      # its images (ids as the pool's index names them)
    pool_excluded: list[str]                 # pool ids left out: labelled test and external images
    pool_masks: int                          # pool images with a region mask
    external: list[Sample]
    hashes: dict[str, str]                   # a digest of each set's file list (paths and sizes)
    notes: list[str] = field(default_factory=list)

    @property
    def test(self) -> list[Sample]:
        """The labelled test split (the images every cell is scored on)."""
        return self.splits["test"]


def prepare_data(cfg: StudyConfig) -> StudyData:
    """Discover, split and check the sets; raises ConfigError naming the set, class or fraction at fault."""
    from ..io.datasets import discover, patient_split
    from ..training.labels import external_set

    if not cfg.data or not cfg.out:
        raise ConfigError("a study needs a labelled set (--data PATH) and an output folder (--out DIR)")
    index = discover(cfg.data)
    labelled = [s for s in index.samples if s.label is not None]
    classes = sorted({str(s.label) for s in labelled})
    if len(classes) < 2:
        raise ConfigError(f"data={cfg.data!r}: a study needs labelled images of at least two classes, found "
                          f"{len(classes)} ({', '.join(classes) or 'no labels'})")
    splits = patient_split(labelled, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.split_seed)
    _check_splits(cfg, splits, classes)
    external = external_set(cfg.test_data, classes) if cfg.test_data else []
    pool_root = cfg.unlabeled or cfg.data
    try:
        pool = discover(pool_root, masks=cfg.masks).samples
    except MimError as exc:
        raise ConfigError(f"the pretraining pool (unlabeled): {exc}") from None
    if not pool:
        raise ConfigError(f"unlabeled={pool_root!r}: no images found for pretraining")
    excluded = _shared_files(pool, splits["test"] + external)
    if len(excluded) == len(pool):
        raise ConfigError(f"unlabeled={pool_root!r}: every pool image is a labelled test image; "
                          "nothing is left to pretrain on")
    notes = list(index.notes)
    if excluded:
        notes.append(f"{len(excluded)} pool image(s) are test or external images and were not pretrained on")
    return StudyData(classes=classes, splits=splits, pool=str(pool_root), pool_ids=[s.id for s in pool],
                     pool_excluded=excluded, pool_masks=sum(s.mask is not None for s in pool), external=external,
                     hashes={"labelled": file_list_digest(labelled), "pool": file_list_digest(pool),
                             "external": file_list_digest(external) if external else None},
                     notes=notes)


def _check_splits(cfg: StudyConfig, splits: dict[str, list[Sample]], classes: list[str]) -> None:
    """Every class has training images (for every fraction) and test images (for its AUC)."""
    for name in ("train", "test"):
        have = {str(s.label) for s in splits[name]}
        missing = [c for c in classes if c not in have]
        if missing:
            raise ConfigError(
                f"data={cfg.data!r}: class {', '.join(missing)} has no {name} image after the patient split "
                f"(test fraction {cfg.test_fraction:g}); add images of that class or change --test-fraction")
    counts = defaultdict(int)
    for s in splits["train"]:
        counts[str(s.label)] += 1
    smallest = min(counts.values())
    for f in cfg.fractions:
        if f * smallest < 0.5:
            # label_subset keeps one image per class at least: say so instead of silently rounding up
            cls = min(counts, key=counts.get)
            raise ConfigError(f"fraction {f:g}: class {cls} has {counts[cls]} training image(s), so {f:g} of them "
                              f"is less than one image; use a fraction of at least {1 / (2 * smallest):.3g}")


def _shared_files(pool: list[Sample], test: list[Sample]) -> list[str]:
    """Ids of pool images that are test images: the same file, or a copy with the same bytes."""
    test_paths = {_real(s.image) for s in test}
    by_size: dict[int, set[str]] = defaultdict(set)
    for s in test:
        by_size[_size(s.image)].add(_digest(s.image))
    shared = []
    for s in pool:
        if _real(s.image) in test_paths:
            shared.append(s.id)
        elif _size(s.image) in by_size and _digest(s.image) in by_size[_size(s.image)]:
            shared.append(s.id)
    return shared


def _real(p: Path) -> str:
    return str(Path(p).resolve())


def _size(p: Path) -> int:
    try:
        return Path(p).stat().st_size
    except OSError:
        return -1


def _digest(p: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_list_digest(samples: list[Sample]) -> str:
    """SHA-256 of the sorted (file name, size, label) list: the same data set gives the same digest."""
    lines = sorted(f"{Path(s.image).name}\t{_size(s.image)}\t{s.label or ''}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


__all__ = ["StudyData", "file_list_digest", "prepare_data"]
