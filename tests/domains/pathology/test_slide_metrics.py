"""Slide-classification metrics against scikit-learn (a test-only dependency), and their bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from foundation_domains.pathology.slide_classification.metrics import (
    auroc,
    balanced_accuracy,
    binary_auroc,
    bootstrap_interval,
    scores,
    weighted_f1,
)


def _probs(rng: np.random.Generator, n: int, classes: int, labels: np.ndarray) -> np.ndarray:
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    p = _probs(rng, 60, 2, y)
    p[:10, 1] = p[10:20, 1]  # ties in the score
    p[:10, 0] = 1 - p[:10, 1]
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p[:, 1]))
    pred = p.argmax(1)
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted"))


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 80)
    p = _probs(rng, 80, 4, y)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    pred = p.argmax(1)
    pred[:5] = 3  # some wrong predictions of one class
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_undefined_auroc_and_absent_classes() -> None:
    assert math.isnan(binary_auroc(np.ones(5, bool), np.arange(5.0)))
    # a class absent from the labels: macro over the classes present
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 1)])
    assert auroc(y, p) == pytest.approx(expected)
    pred = p.argmax(1)  # predicts class 2 once: F1 and balanced accuracy as scikit-learn
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted"))


def test_bootstrap_interval_brackets_the_value_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = _probs(rng, 50, 2, y)
    lo, hi = bootstrap_interval(y, p, "auroc", n=300, seed=3)
    assert lo <= auroc(y, p) <= hi and 0 < hi - lo < 0.5
    assert (lo, hi) == bootstrap_interval(y, p, "auroc", n=300, seed=3)
    result = scores(y, p, bootstrap=100)
    assert set(result) == {
        "n",
        "auroc",
        "auroc_ci",
        "balanced_accuracy",
        "balanced_accuracy_ci",
        "f1",
        "f1_ci",
    }
    assert all(math.isnan(v) for v in bootstrap_interval(y, p, "f1", n=0))
