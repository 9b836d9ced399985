"""Classification metrics (scikit-learn): accuracy, macro AUC, AP - binary and multi-class.

* **binary**: AUC and AP of the positive class (``positive``; default the second
  of the sorted class names), from its predicted probability;
* **multi-class**: one-vs-rest per class, then the unweighted mean (macro) over
  the classes that can be scored.

A class can be scored only when the evaluated split holds both positive and
negative examples of it.  Classes missing from a (small) test split are left
out of the macro mean and named in ``notes``; when no class can be scored, AUC
and AP are None.  Also reported: balanced accuracy, the per-class AUC/AP and
the confusion matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], *,
                           positive: str | None = None) -> dict[str, Any]:
    """JSON-safe metrics of labels ``y_true`` [n] (class indices) against ``probs`` [n, K] (see the module docstring).

    Always ``n``, ``classes``, ``accuracy``, ``balanced_accuracy``, ``auc``, ``ap`` (None when undefined) and
    ``notes``; with samples also per-class AUC/AP, ``support``, ``confusion``.  ValueError for a wrong ``probs``
    shape or an unknown ``positive``."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        balanced_accuracy_score,
        confusion_matrix,
        roc_auc_score,
    )

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    K = len(classes)
    if p.ndim != 2 or p.shape != (len(y), K):
        raise ValueError(f"probs must be [n, {K}], got {p.shape}")
    notes: list[str] = []
    out: dict[str, Any] = {"n": int(len(y)), "classes": list(classes)}
    if len(y) == 0:
        out.update(accuracy=None, balanced_accuracy=None, auc=None, ap=None, notes=["no samples to evaluate"])
        return out
    pred = p.argmax(axis=1)
    out["accuracy"] = float(accuracy_score(y, pred))
    present = sorted(set(y.tolist()))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": expected with small splits
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred)) if len(present) > 1 else None
    out["support"] = {classes[k]: int((y == k).sum()) for k in range(K)}
    out["confusion"] = confusion_matrix(y, pred, labels=list(range(K))).tolist()
    per_auc: dict[str, float | None] = {}
    per_ap: dict[str, float | None] = {}
    for k in range(K):
        pos = y == k
        if pos.all() or not pos.any():
            per_auc[classes[k]] = per_ap[classes[k]] = None
            continue
        per_auc[classes[k]] = float(roc_auc_score(pos, p[:, k]))
        per_ap[classes[k]] = float(average_precision_score(pos, p[:, k]))
    out["auc_per_class"], out["ap_per_class"] = per_auc, per_ap
    missing = [c for c in classes if out["support"][c] == 0]
    if missing:
        notes.append(f"class(es) missing from the evaluated split: {', '.join(missing)}")
    if K == 2:
        pos_name = positive if positive is not None else classes[1]
        if pos_name not in classes:
            raise ValueError(f"positive class {pos_name!r} is not one of {list(classes)}")
        out["positive_class"] = pos_name
        out["auc"], out["ap"] = per_auc[pos_name], per_ap[pos_name]
        if out["auc"] is None:
            notes.append("only one class in the evaluated split: AUC and AP are undefined")
    else:
        scored = [c for c in classes if per_auc[c] is not None]
        out["auc"] = float(np.mean([per_auc[c] for c in scored])) if scored else None
        out["ap"] = float(np.mean([per_ap[c] for c in scored])) if scored else None
        out["averaged_over"] = scored
        if not scored:
            notes.append("no class has both positives and negatives in the evaluated split: AUC and AP undefined")
        elif len(scored) < K:
            notes.append(f"macro AUC/AP over {len(scored)} of {K} classes (the others cannot be scored)")
    out["notes"] = notes
    return out


def pixel_auc(scores: list[np.ndarray], truths: list[np.ndarray]) -> float | None:
    """ROC AUC over all pixels of several images (score maps vs bool masks); None if one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.asarray(t, dtype=bool).ravel() for t in truths])
    s = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in scores])
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


__all__ = ["pixel_auc", "classification_metrics"]
