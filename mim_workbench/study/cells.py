"""The downstream runs of a study: every (variant, label fraction, seed) cell.

A cell is a ``finetune`` run (linear probe or full fine-tuning) in
``<out>/runs/<variant>/f<fraction>-s<seed>/`` plus the k-NN score of the same labels on
frozen features (``knn.json``).  A cell whose three files exist is read back instead of
run again, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.config import EncoderConfig
from ..training.control import Control
from .config import StudyConfig
from .data import StudyData
from .encoders import Encoder

if TYPE_CHECKING:
    from ..training.finetune import FeatureCache

METRICS = ("auc", "ap", "accuracy", "balanced_accuracy")


@dataclass
class Cell:
    variant: str
    fraction: float
    seed: int
    metrics: dict[str, Any]                 # on the labelled test split
    external: dict[str, Any] | None         # on the external set
    knn: dict[str, Any]                     # {"auc": ..., "external_auc": ...}
    n_train: int
    seconds: float
    test_scores: np.ndarray                 # positive-class probability per test image (StudyData.test order)
    external_scores: np.ndarray | None
    reused: bool = False

    def row(self) -> dict[str, Any]:
        """One flat, JSON-safe row of the study's cell table (METRICS, k-NN AUC, external ones when scored)."""
        r: dict[str, Any] = {"variant": self.variant, "fraction": self.fraction, "seed": self.seed,
                             "n_train": self.n_train}
        r.update({m: self.metrics.get(m) for m in METRICS})
        r["knn_auc"] = self.knn.get("auc")
        if self.external is not None:
            r.update({f"external_{m}": self.external.get(m) for m in METRICS})
            r["external_knn_auc"] = self.knn.get("external_auc")
        r.update(seconds=round(self.seconds, 2), reused=self.reused)
        return r


def cell_dir(root: Path, variant: str, fraction: float, seed: int) -> Path:
    """``root/runs/<variant>/f<fraction>-s<seed>``, with ``/`` and ``:`` of the variant name made ``_``."""
    return root / "runs" / variant.replace("/", "_").replace(":", "_") / f"f{fraction:g}-s{seed}"


def finetune_values(cfg: StudyConfig, enc: Encoder, arch: EncoderConfig, fraction: float, seed: int,
                    out: Path) -> dict[str, Any]:
    """FinetuneConfig fields of one cell: every variant is scored on the same split."""
    values = {"data": cfg.data, "test_data": cfg.test_data, "mode": cfg.mode, "fraction": fraction, "seed": seed,
              "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed,
              "device": cfg.device, "threads": cfg.threads, "checkpoint": enc.source, "out": str(out),
              **cfg.finetune}
    if enc.source is None:   # scratch: the same architecture as the pretrained variants
        values["encoder"] = arch.to_dict()
    else:
        values["img_size"] = list(arch.img_size)
    return values


def run_cell(cfg: StudyConfig, data: StudyData, enc: Encoder, arch: EncoderConfig, fraction: float, seed: int,
             root: Path, *, features: Callable[[int], dict[str, np.ndarray]], control: Control,
             cache: FeatureCache | None) -> Cell:
    """Run (or read back) one cell; ``features(seed)`` gives the k-NN feature table of this encoder."""
    out = cell_dir(root, enc.variant, fraction, seed)
    if all((out / f).is_file() for f in ("metrics.json", "predictions.csv", "knn.json")):
        return _read_cell(enc.variant, fraction, seed, out, data, reused=True)
    if out.exists():
        shutil.rmtree(out)   # an interrupted run: its few seconds are cheaper than doubting it
    from ..training.finetune import FinetuneConfig, finetune

    t0 = time.perf_counter()
    res = finetune(FinetuneConfig.from_dict(finetune_values(cfg, enc, arch, fraction, seed, out)),
                   control=control, feature_cache=cache)
    knn = _knn(cfg, data, res.classes, fraction, seed, features)
    (out / "knn.json").write_text(json.dumps({**knn, "seconds": time.perf_counter() - t0}) + "\n", encoding="utf-8")
    return _read_cell(enc.variant, fraction, seed, out, data, reused=False)


def positive_index(classes: list[str], positive: str | None) -> int:
    """Index of ``positive`` in ``classes``; else the second class (the first when there is only one)."""
    return classes.index(positive) if positive in classes else min(1, len(classes) - 1)


def _knn(cfg: StudyConfig, data: StudyData, classes: list[str], fraction: float, seed: int,
         features: Callable[[int], dict[str, np.ndarray]]) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from ..training.labels import label_subset
    from .knn import knn_probabilities

    table = features(seed)                    # image path -> feature row
    train = label_subset(data.splits["train"], fraction, seed)
    label_of = {c: k for k, c in enumerate(classes)}
    pos = positive_index(classes, cfg.finetune.get("positive_class"))
    x = np.stack([table[str(s.image)] for s in train])
    y = np.array([label_of[str(s.label)] for s in train])
    out: dict[str, Any] = {}
    for name, samples in (("auc", data.test), ("external_auc", data.external)):
        if not samples:
            continue
        probs = knn_probabilities(x, y, np.stack([table[str(s.image)] for s in samples]), k=cfg.knn_k,
                                  n_classes=len(classes))
        truth = np.array([label_of[str(s.label)] == pos for s in samples])
        out[name] = float(roc_auc_score(truth, probs[:, pos])) if 0 < truth.sum() < len(truth) else None
    return out


def _read_cell(variant: str, fraction: float, seed: int, out: Path, data: StudyData, *, reused: bool) -> Cell:
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    knn = json.loads((out / "knn.json").read_text(encoding="utf-8"))
    classes = list(m["classes"])
    pos = positive_index(classes, (m.get("metrics") or {}).get("positive_class"))
    scores = _scores(out / "predictions.csv", f"p_{classes[pos]}")
    test = np.array([scores["test"][s.id] for s in data.test])
    ext = np.array([scores["external"][s.id] for s in data.external]) if data.external else None
    return Cell(variant=variant, fraction=fraction, seed=seed, metrics=m.get("metrics") or {},
                external=m.get("external"), knn=knn, n_train=int(m["n_train"]),
                seconds=float(knn.get("seconds") or 0.0), test_scores=test, external_scores=ext, reused=reused)


def _scores(path: Path, column: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            out.setdefault(r["split"], {})[r["id"]] = float(r[column])
    return out


__all__ = ["METRICS", "Cell", "cell_dir", "finetune_values", "positive_index", "run_cell"]
