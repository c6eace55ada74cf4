"""AUROC (one-vs-rest macro for several classes), balanced accuracy and weighted F1 in numpy, with bootstrap 95%
intervals. scikit-learn's definitions (tests compare with it); it is not a runtime dependency.
"""

from __future__ import annotations

import math

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when one of the two classes is absent."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _ranks(np.asarray(score, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUROC of class 1's probability. Several classes: mean one-vs-rest AUROC over the classes present
    with both positives and negatives (scikit-learn's ``multi_class='ovr', average='macro'`` when all are)."""
    labels = np.asarray(labels)
    if probs.shape[1] == 2:
        return binary_auroc(labels == 1, probs[:, 1])
    values = [binary_auroc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    recalls = [float((predicted[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else math.nan


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 per class (0 where undefined), averaged with each class's share of ``labels``."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if len(labels) == 0:
        return math.nan
    total = 0.0
    for c in np.unique(np.r_[labels, predicted]):
        tp = float(((predicted == c) & (labels == c)).sum())
        fp = float(((predicted == c) & (labels != c)).sum())
        fn = float(((predicted != c) & (labels == c)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        total += f1 * float((labels == c).sum())
    return total / len(labels)


METRICS = {
    "auroc": lambda y, p: auroc(y, p),
    "balanced_accuracy": lambda y, p: balanced_accuracy(y, p.argmax(1)),
    "f1": lambda y, p: weighted_f1(y, p.argmax(1)),
}


def bootstrap_interval(
    labels: np.ndarray, probs: np.ndarray, metric: str, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of ``metric`` over ``n`` resamples of the slides (with replacement); resamples
    where it is undefined (AUROC with one class) are left out. NaN when ``n`` is 0 or none is defined."""
    fn = METRICS[metric]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        v = fn(labels[idx], probs[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def scores(
    labels: np.ndarray, probs: np.ndarray, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, object]:
    """Every metric and its interval (``<metric>_ci``) on one set of slides."""
    out: dict[str, object] = {"n": len(labels)}
    for name, fn in METRICS.items():
        out[name] = fn(labels, probs)
        out[f"{name}_ci"] = list(bootstrap_interval(labels, probs, name, bootstrap, seed))
    return out
