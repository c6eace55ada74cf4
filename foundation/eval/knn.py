"""Weighted k-nearest-neighbour classification on frozen features, the DINO protocol (Caron et al. 2021,
arXiv 2104.14294, ``eval_knn.py``): cosine similarity, top-k neighbours, votes weighted by ``exp(sim / T)``.

It needs no training and no hyper-parameter search, which makes it the cheap, stable signal to track
during pretraining; the defaults ``k = 20``, ``T = 0.07`` are DINO's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from foundation.errors import ConfigError, DataError


def _check_features(features: Tensor, labels: Tensor | None, num_classes: int, name: str) -> None:
    if features.ndim != 2:
        raise DataError(f"{name}_features must be (N, D), got shape {tuple(features.shape)!r}")
    if labels is None:
        return
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise DataError(
            f"{name}_labels must be ({features.shape[0]},) to match {name}_features, "
            f"got shape {tuple(labels.shape)!r}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise DataError(f"{name}_labels must be integers, got dtype {labels.dtype!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise DataError(f"{name}_labels contain {bad!r}, outside [0, num_classes={num_classes!r})")


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores for every test row by temperature-weighted voting of its k nearest training rows.

    Features are L2-normalised, so the similarity is the cosine. Each neighbour ``j`` votes for its label
    with weight ``exp(sim_j / T)``. Test rows are processed ``chunk_size`` at a time so the similarity
    matrix never exceeds ``chunk_size x N_train``.

    Args:
        train_features: ``(N, D)`` training (memory bank) features.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` query features.
        num_classes: number of classes C.
        k: neighbours per query; clamped to ``N`` when the bank is smaller.
        temperature: ``T`` in the vote weight ``exp(sim / T)``.
        chunk_size: test rows per similarity block.

    Returns:
        ``(M, C)`` scores on the training features' device (argmax is the prediction).

    Raises:
        ConfigError: non-positive ``k``, ``temperature``, ``chunk_size`` or ``num_classes``.
        DataError: empty training set, mismatched shapes or labels out of range.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be >= 1")
    if k < 1:
        raise ConfigError(f"knn k={k!r} must be >= 1")
    if not temperature > 0:
        raise ConfigError(f"knn temperature={temperature!r} must be > 0")
    if chunk_size < 1:
        raise ConfigError(f"knn chunk_size={chunk_size!r} must be >= 1")
    _check_features(train_features, train_labels, num_classes, "train")
    _check_features(test_features, None, num_classes, "test")
    if train_features.shape[0] == 0:
        raise DataError("kNN needs at least one training feature, got an empty train set")
    if test_features.shape[1] != train_features.shape[1]:
        raise DataError(
            f"test_features have dimension {test_features.shape[1]!r} but train_features have "
            f"{train_features.shape[1]!r}"
        )
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    device = train_features.device
    bank = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.int64)
    k = min(k, bank.shape[0])
    scores = torch.zeros(test_features.shape[0], num_classes, dtype=dtype, device=device)
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start : start + chunk_size].to(device=device, dtype=dtype), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1, largest=True, sorted=True)
        weights = (sim / temperature).exp()
        # sum_j w_j * one_hot(label_j), without materialising the (chunk, k, C) one-hot tensor
        scores[start : start + query.shape[0]].scatter_add_(1, labels[idx], weights)
    return scores


def _accuracy(scores: Tensor, test_labels: Tensor, topk: int) -> float:
    top = scores.topk(min(topk, scores.shape[1]), dim=1).indices
    hit = (top == test_labels.to(top.device, torch.int64).view(-1, 1)).any(dim=1)
    return hit.double().mean().item()


def _scores_for_evaluation(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> Tensor:
    _check_features(test_features, test_labels, num_classes, "test")
    if test_features.shape[0] == 0:
        raise DataError("kNN accuracy needs at least one test feature, got an empty test set")
    return knn_predict(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)


def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 kNN accuracy as a fraction in ``[0, 1]`` (arguments as in :func:`knn_predict`)."""
    scores = _scores_for_evaluation(
        train_features, train_labels, test_features, test_labels, num_classes, k, temperature, chunk_size
    )
    return _accuracy(scores, test_labels, 1)


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, Any]:
    """kNN accuracies for logging.

    Returns:
        ``{"top1", "top5", "k", "temperature"}``: accuracies are fractions in ``[0, 1]``; ``top5`` is
        present only when ``num_classes >= 5``; ``k`` is the number of neighbours actually used (clamped to
        the training-set size).
    """
    scores = _scores_for_evaluation(
        train_features, train_labels, test_features, test_labels, num_classes, k, temperature, 1024
    )
    result: dict[str, Any] = {"top1": _accuracy(scores, test_labels, 1)}
    if num_classes >= 5:
        result["top5"] = _accuracy(scores, test_labels, 5)
    result["k"] = min(k, train_features.shape[0])
    result["temperature"] = float(temperature)
    return result
