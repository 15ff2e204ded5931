"""GLUE metrics against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.evaluation import metrics


def test_accuracy_and_f1_by_hand():
    pred = [1, 1, 0, 0, 1]
    gold = [1, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 1
    assert metrics.accuracy(pred, gold) == pytest.approx(3 / 5)
    assert metrics.f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.f1_binary([0, 0], [1, 0]) == 0.0  # no true positive


def test_matthews_binary_by_hand():
    pred = [1, 1, 0, 0, 1]
    gold = [1, 0, 0, 1, 1]
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 − 1·1) / sqrt(3·3·2·2) = 1/6
    assert metrics.matthews(pred, gold) == pytest.approx(1 / 6)
    assert metrics.matthews(gold, gold) == pytest.approx(1.0)
    assert metrics.matthews([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert metrics.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction: undefined → 0


def _mcc_onehot(pred, gold, n_classes):
    """Independent formula: correlation of the one-hot indicator matrices (Gorodkin 2004)."""
    x = np.eye(n_classes)[pred]
    y = np.eye(n_classes)[gold]
    x, y = x - x.mean(0), y - y.mean(0)
    return np.sum(x * y) / math.sqrt(np.sum(x * x) * np.sum(y * y))


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_matthews_matches_onehot_correlation(n_classes):
    rng = np.random.default_rng(n_classes)
    gold = rng.integers(0, n_classes, 200)
    pred = np.where(rng.random(200) < 0.6, gold, rng.integers(0, n_classes, 200))
    assert metrics.matthews(pred, gold) == pytest.approx(_mcc_onehot(pred, gold, n_classes), abs=1e-12)


def test_pearson_and_spearman_by_hand():
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    # ranks of x with the tie averaged: 1, 2.5, 2.5, 4; deviations (−1.5, 0, 0, 1.5) and (−1.5, .5, −.5, 1.5)
    assert list(metrics.average_ranks(x)) == [1.0, 2.5, 2.5, 4.0]
    assert metrics.spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    # Pearson of (1,2,3,4) and (2,4,5,9): Σdxdy = 11, Σdx² = 5, Σdy² = 26
    assert metrics.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))


def test_spearman_without_ties_matches_rank_difference_formula():
    rng = np.random.default_rng(0)
    a, b = rng.permutation(50), rng.permutation(50)
    d = (a - b).astype(float)
    n = 50
    assert metrics.spearman(a, b) == pytest.approx(1 - 6 * np.sum(d * d) / (n * (n * n - 1)), abs=1e-12)
    assert metrics.pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_against_scipy_and_sklearn_when_installed():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=300), 1)  # rounded: many ties
    y = x + rng.normal(size=300)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    gold, pred = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert metrics.matthews(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred), abs=1e-12)
    assert metrics.f1_binary(pred, gold) == pytest.approx(skm.f1_score(gold, pred), abs=1e-12)


def test_binomial_se():
    assert metrics.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert metrics.binomial_se(160 / 277, 277) == pytest.approx(math.sqrt(160 * 117 / 277**3))
    assert metrics.binomial_se(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        metrics.binomial_se(0.5, 0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 0], [1])
