"""The study's intervals on synthetic cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mim_workbench.errors import ConfigError
from mim_workbench.study.stats import auc_interval, auc_rows, paired_auc_difference


def _case(n: int = 400, seeds: int = 3, separation: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, rng.normal(size=(seeds, n)) + separation * y


def test_rank_auc_matches_scikit_learn_with_ties():
    y, s = _case()
    s = np.round(s, 1)   # ties
    assert np.allclose(auc_rows(y, s), [roc_auc_score(y, row) for row in s])


def test_an_informative_model_beats_a_random_one_with_an_interval_above_zero():
    y, good = _case(separation=1.5)
    _, noise = _case(separation=0.0, seed=1)
    diff = paired_auc_difference(y, good, noise, n_boot=1000)
    truth = np.mean([roc_auc_score(y, g) - roc_auc_score(y, r) for g, r in zip(good, noise)])
    assert diff.value == pytest.approx(truth) and diff.low > 0.2 and diff.low < diff.value < diff.high
    assert diff.excludes_zero


def test_a_model_against_itself_differs_by_exactly_zero_and_random_scores_include_zero():
    y, s = _case()
    same = paired_auc_difference(y, s, s, n_boot=500)
    assert same.value == same.low == same.high == 0.0
    _, a = _case(separation=0.0, seed=2)
    _, b = _case(separation=0.0, seed=3)
    assert not paired_auc_difference(y, a, b, n_boot=1000).excludes_zero


def test_the_auc_interval_covers_the_true_auc_of_the_generating_model():
    # Two unit normals 1.0 apart: the population AUC is Phi(1 / sqrt(2)) = 0.760.
    y, s = _case(n=2000, separation=1.0)
    iv = auc_interval(y, s, n_boot=1000)
    assert iv.low < 0.760 < iv.high and iv.high - iv.low < 0.06


def test_bad_shapes_and_one_class_are_refused():
    y, s = _case()
    with pytest.raises(ConfigError, match="both classes"):
        auc_interval(np.zeros(400, int), s)
    with pytest.raises(ConfigError, match="shape"):
        paired_auc_difference(y, s, s[:2, :10])
