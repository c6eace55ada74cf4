"""DINO kNN protocol: hand-computed votes, k clamping, chunk invariance, accuracies and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from foundation.errors import ConfigError, DataError
from foundation.eval.knn import knn_evaluate, knn_predict, knn_top1

T = 0.07
# Three training points in 2-D and one query; cosines worked out by hand below.
TRAIN = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1])
QUERY = torch.tensor([[2.0, 1.0]])
SIM_A = 2 / math.sqrt(5)  # (2,1).(1,0) / (|(2,1)| |(1,0)|)
SIM_B = 1 / math.sqrt(5)  # (2,1).(0,1) / ...
SIM_C = 3 / math.sqrt(10)  # (2,1).(1,1) / (sqrt5 sqrt2); the nearest, then A, then B


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_hand_computed_scores(dtype: torch.dtype, rel: float) -> None:
    scores = knn_predict(TRAIN.to(dtype), TRAIN_LABELS, QUERY.to(dtype), num_classes=3, k=2, temperature=T)
    assert scores.shape == (1, 3)
    # k=2 keeps C (label 1) and A (label 0); B is dropped.
    assert scores[0, 0].item() == pytest.approx(math.exp(SIM_A / T), rel=rel)
    assert scores[0, 1].item() == pytest.approx(math.exp(SIM_C / T), rel=rel)
    assert scores[0, 2].item() == 0.0

    scores = knn_predict(TRAIN.to(dtype), TRAIN_LABELS, QUERY.to(dtype), num_classes=3, k=3, temperature=T)
    assert scores[0, 0].item() == pytest.approx(math.exp(SIM_A / T), rel=rel)
    assert scores[0, 1].item() == pytest.approx(math.exp(SIM_C / T) + math.exp(SIM_B / T), rel=rel)


def test_k_one_is_nearest_neighbour_and_scale_invariant() -> None:
    scores = knn_predict(TRAIN * 7.0, TRAIN_LABELS, QUERY * 0.01, num_classes=2, k=1, temperature=T)
    assert scores[0, 0].item() == 0.0
    assert scores[0, 1].item() == pytest.approx(math.exp(SIM_C / T), rel=1e-5)


def test_k_larger_than_train_set_is_clamped() -> None:
    big = knn_predict(TRAIN, TRAIN_LABELS, QUERY, num_classes=2, k=20, temperature=T)
    exact = knn_predict(TRAIN, TRAIN_LABELS, QUERY, num_classes=2, k=3, temperature=T)
    torch.testing.assert_close(big, exact)
    result = knn_evaluate(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([1]), num_classes=2, k=20)
    assert result == {"top1": 1.0, "k": 3, "temperature": T}


def test_chunking_matches_single_chunk() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    test = torch.randn(37, 16, generator=g)
    whole = knn_predict(train, labels, test, num_classes=4, k=7, chunk_size=1024)
    for chunk in (1, 5, 36, 37):
        torch.testing.assert_close(knn_predict(train, labels, test, 4, k=7, chunk_size=chunk), whole)


def clusters(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, 32) * 10.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.1 * torch.randn(len(labels), 32, generator=g), labels


def test_separable_clusters_are_perfect() -> None:
    train, train_labels = clusters(6, 30, seed=0)
    test, test_labels = clusters(6, 10, seed=1)
    assert knn_top1(train, train_labels, test, test_labels, num_classes=6) == 1.0
    result = knn_evaluate(train, train_labels, test, test_labels, num_classes=6)
    assert result == {"top1": 1.0, "top5": 1.0, "k": 20, "temperature": T}
    # fewer than 5 classes: no top-5 key
    train3, labels3 = clusters(3, 10, seed=2)
    assert "top5" not in knn_evaluate(train3, labels3, train3, labels3, num_classes=3)


def test_wrong_predictions_are_counted() -> None:
    train, train_labels = clusters(2, 10, seed=0)
    test, test_labels = clusters(2, 5, seed=1)
    flipped = 1 - test_labels
    flipped[:2] = test_labels[:2]  # 2 of 10 right
    assert knn_top1(train, train_labels, test, flipped, num_classes=2) == pytest.approx(0.2)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="k=0"):
        knn_predict(TRAIN, TRAIN_LABELS, QUERY, 2, k=0)
    with pytest.raises(ConfigError, match="temperature=0"):
        knn_predict(TRAIN, TRAIN_LABELS, QUERY, 2, temperature=0)
    with pytest.raises(DataError, match="5"):
        knn_predict(TRAIN, torch.tensor([0, 1, 5]), QUERY, 2)
    with pytest.raises(DataError, match="dimension"):
        knn_predict(TRAIN, TRAIN_LABELS, torch.ones(1, 3), 2)
    with pytest.raises(DataError, match="empty"):
        knn_predict(torch.ones(0, 2), torch.ones(0, dtype=torch.long), QUERY, 2)
