"""Intervals for a study: AUC with a hierarchical bootstrap over test images and seeds.

A study scores every variant on the same test images with several seeds (label subsets
and head initialisations), so a difference between two variants is *paired*: each
bootstrap replicate draws one resample of the test images (stratified by class, so every
replicate has both classes) and one resample of the seeds, and scores both variants on
that same draw.  Its spread therefore holds both sources of noise a reviewer asks about,
the finite test set and the training randomness.  ``scipy.stats.bootstrap`` resamples one
level only, hence this two-level version; the AUCs of all replicates are computed at once
from ranks (``scipy.stats.rankdata``, the Mann-Whitney form of the AUC).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from ..errors import ConfigError

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float
    n_boot: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a difference the bootstrap supports)."""
        return self.low > 0.0 or self.high < 0.0

    def text(self, signed: bool = False) -> str:
        """``"0.812 [0.790, 0.834]"`` (three decimals; with ``signed`` a sign on every number)."""
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(self.value)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Binary ROC AUC of every row of ``scores`` ``[..., n]`` against ``labels`` ``[..., n]``
    (broadcast), ties counted half, from the rank sum of the positives."""
    pos = np.broadcast_to(labels.astype(bool), scores.shape)
    n1 = pos.sum(axis=-1)
    n0 = pos.shape[-1] - n1
    ranks = rankdata(scores, axis=-1)
    u = np.where(pos, ranks, 0.0).sum(axis=-1) - n1 * (n1 + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (n1 * n0)


def _draws(labels: np.ndarray, n_seeds: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image indices ``[B, n]``, resampled per class; seed indices ``[B, S]``)."""
    rng = np.random.default_rng(seed)
    parts = []
    for cls in (False, True):
        members = np.flatnonzero(labels.astype(bool) == cls)
        parts.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(parts, axis=1), rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def _check(labels: np.ndarray, *scores: np.ndarray) -> None:
    if labels.ndim != 1 or not 0 < labels.astype(bool).sum() < len(labels):
        raise ConfigError("an AUC interval needs test images of both classes")
    for s in scores:
        if s.ndim != 2 or s.shape[1] != len(labels):
            raise ConfigError(f"scores of shape {s.shape}: expected [seeds, {len(labels)}]")


def auc_interval(labels: np.ndarray, scores: np.ndarray, *, n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> Interval:
    """Mean AUC over seeds of ``scores`` ``[seeds, n]``, with its hierarchical bootstrap interval."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    _check(labels, scores)
    images, seeds = _draws(labels, len(scores), n_boot, seed)
    picked = scores[seeds[:, :, None], images[:, None, :]]                  # [B, S, n]
    boot = auc_rows(labels[images][:, None, :], picked).mean(axis=1)
    return _interval(float(auc_rows(labels, scores).mean()), boot, level)


def paired_auc_difference(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
                          n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean over seeds of AUC(a) - AUC(b) on the same test images, with its paired interval.

    ``scores_a`` and ``scores_b`` are ``[seeds, n]``; seed ``k`` of both used the same label
    subset, so they are resampled together.
    """
    labels = np.asarray(labels)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    _check(labels, a, b)
    if a.shape != b.shape:
        raise ConfigError(f"paired scores differ in shape: {a.shape} vs {b.shape}")
    images, seeds = _draws(labels, len(a), n_boot, seed)
    lab = labels[images][:, None, :]
    diff = (auc_rows(lab, a[seeds[:, :, None], images[:, None, :]])
            - auc_rows(lab, b[seeds[:, :, None], images[:, None, :]])).mean(axis=1)
    return _interval(float((auc_rows(labels, a) - auc_rows(labels, b)).mean()), diff, level)


def _interval(value: float, boot: np.ndarray, level: float) -> Interval:
    lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return Interval(value=value, low=float(lo), high=float(hi), n_boot=int(np.isfinite(boot).sum()))


__all__ = ["Interval", "auc_interval", "auc_rows", "paired_auc_difference"]
