"""GLUE metrics and their standard errors, in numpy (no I/O, no scipy/sklearn).

With predictions ŷ and labels y over n examples::

    accuracy     = (1/n) Σ [ŷ_i = y_i]
    F1 (binary)  = 2·TP / (2·TP + FP + FN)                       # positive class 1 (MRPC: equivalent)
    Matthews     = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))   # 0 when a factor is 0
                   (multiclass: the Gorodkin R_K from the confusion matrix C,
                    (c·s − Σ_k p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)), c = trace C, s = n)
    Pearson r    = Σ (x−x̄)(y−ȳ) / sqrt(Σ (x−x̄)² Σ (y−ȳ)²)
    Spearman ρ   = Pearson r of the ranks (ties get the average of the ranks they span)

Binomial standard error of a proportion p measured on n examples (accuracy, or agreement with
the FP32 model's predictions): ``se = sqrt(p (1 − p) / n)``.  It is the sampling error of the
dev set, the yardstick for "is this difference noise".
"""

from __future__ import annotations

import math

import numpy as np


def _as_int(a) -> np.ndarray:
    return np.asarray(a).astype(np.int64).reshape(-1)


def _check_same_length(pred: np.ndarray, label: np.ndarray) -> None:
    if pred.shape != label.shape:
        raise ValueError(f"predictions and labels differ in length ({pred.size} vs {label.size})")
    if pred.size == 0:
        raise ValueError("no examples to score")


def accuracy(pred, label) -> float:
    p, y = _as_int(pred), _as_int(label)
    _check_same_length(p, y)
    return float(np.mean(p == y))


def f1_binary(pred, label, positive: int = 1) -> float:
    p, y = _as_int(pred) == positive, _as_int(label) == positive
    _check_same_length(p, y)
    tp = int(np.sum(p & y))
    fp = int(np.sum(p & ~y))
    fn = int(np.sum(~p & y))
    return 0.0 if tp == 0 else 2.0 * tp / (2 * tp + fp + fn)


def matthews(pred, label) -> float:
    """Matthews correlation (Gorodkin's R_K for more than two classes); 0 when undefined."""
    p, y = _as_int(pred), _as_int(label)
    _check_same_length(p, y)
    classes = np.union1d(p, y)
    pi, yi = np.searchsorted(classes, p), np.searchsorted(classes, y)
    conf = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t, pk = conf.sum(axis=1), conf.sum(axis=0)  # true / predicted counts per class
    c, s = float(np.trace(conf)), float(conf.sum())
    cov_py = c * s - float(t @ pk)
    cov_pp = s * s - float(pk @ pk)
    cov_yy = s * s - float(t @ t)
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return cov_py / math.sqrt(cov_pp * cov_yy)


def pearson(x, y) -> float:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    _check_same_length(a, b)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if den == 0 else float(a @ b) / den


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n; tied values get the mean of the ranks they occupy."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # start of each run of equal values, and the average rank of the run
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def binomial_se(p: float, n: int) -> float:
    """sqrt(p (1 − p) / n): standard error of a proportion p measured on n examples."""
    if n <= 0:
        raise ValueError("n must be positive")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)
