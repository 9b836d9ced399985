"""Labels for fine-tuning: stratified label fractions, class weights, balanced sampling.

``label_subset(samples, fraction, seed)`` is how the "1 % / 5 % / 10 % / 50 % /
100 % of the labels" of RGMIM's Table 2 are chosen: per class, a permutation of
the class's samples (sorted by id first, so the input order does not matter)
drawn from ``seed``, of which the first ``max(1, round(fraction * n_class))``
are kept.  For one seed the subsets are nested (the 1 % set is inside the 5 %
set, ...), every class keeps at least one labelled sample, and a different seed
gives a different subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

#: The label fractions of RGMIM's Table 2.
TABLE_FRACTIONS = (0.01, 0.05, 0.1, 0.5, 1.0)


def label_subset(samples: Sequence[Any], fraction: float, seed: int = 0) -> list[Any]:
    """Stratified, reproducible subset of labelled ``samples`` (see the module docstring).

    Samples keep their input order.  Unlabelled samples (``label`` None) are dropped.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction={fraction!r}: must be in (0, 1]")
    by_class: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if s.label is not None:
            by_class.setdefault(str(s.label), []).append(i)
    keep: set[int] = set()
    for k, label in enumerate(sorted(by_class)):
        idx = sorted(by_class[label], key=lambda i: str(samples[i].id))
        n = len(idx) if fraction >= 1.0 else max(1, int(round(fraction * len(idx))))
        rng = np.random.default_rng([int(seed), k, 7_919])
        perm = rng.permutation(len(idx))
        keep.update(idx[j] for j in perm[:n])
    return [s for i, s in enumerate(samples) if i in keep]


def class_counts(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """int64 ``[num_classes]``: how many ``labels`` (class indices) fall in each class; larger indices are dropped."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """``n / (K * n_c)`` per class (1 for a balanced set; 0 for classes without samples)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def balanced_indices(labels: Sequence[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` sample indices drawn with replacement so that every class is equally likely."""
    lab = torch.as_tensor(list(labels), dtype=torch.int64)
    counts = torch.bincount(lab).float()
    w = 1.0 / counts[lab]
    return torch.multinomial(w, n, replacement=True, generator=generator)


def external_set(path: str, classes: Sequence[str]) -> list[Any]:
    """The labelled images of an external test set (another hospital), checked against the
    training ``classes``: each of its classes must be one the model knows, and it needs two."""
    from ..io.datasets import discover

    index = discover(path)
    samples = [s for s in index.samples if s.label is not None]
    found = sorted({str(s.label) for s in samples})
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ConfigError(f"test_data={path!r}: class(es) {', '.join(unknown)} are not among the training classes "
                          f"({', '.join(classes)}); an external test set uses the same class names")
    if len(found) < 2:
        raise ConfigError(f"test_data={path!r}: an external test set needs images of at least two classes, found "
                          f"{len(found)} ({', '.join(found) or 'no labels'})")
    return samples



__all__ = ["TABLE_FRACTIONS", "balanced_indices", "class_counts", "class_weights", "external_set", "label_subset"]
