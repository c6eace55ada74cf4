"""Linear probe: separable blobs, determinism, weight-decay choice, balanced accuracy by hand, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from foundation.errors import ConfigError, DataError
from foundation.eval.linear import _fit, balanced_accuracy, linear_probe, stratified_split


def blobs(
    per_class: list[int], dim: int, seed: int, spread: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(len(per_class), dim, generator=torch.Generator().manual_seed(123)) * 3.0
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed)) * spread
    return centres[labels] + noise + 5.0, labels  # offset: the probe must standardise


def test_separable_blobs() -> None:
    x, y = blobs([100] * 4, 32, seed=0)
    xt, yt = blobs([50] * 4, 32, seed=1)
    result = linear_probe(x, y, xt, yt, num_classes=4, max_iter=50)
    assert set(result) == {"top1", "balanced_accuracy", "weight_decay"}
    assert result["top1"] > 0.95
    assert result["balanced_accuracy"] > 0.95
    assert result["weight_decay"] in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def test_deterministic_and_grid_respected() -> None:
    x, y = blobs([40, 60, 30], 16, seed=2, spread=4.0)
    xt, yt = blobs([20, 20, 20], 16, seed=3, spread=4.0)
    a = linear_probe(x, y, xt, yt, 3, max_iter=30, weight_decays=[1e-3, 1e-1], seed=7)
    b = linear_probe(x, y, xt, yt, 3, max_iter=30, weight_decays=[1e-3, 1e-1], seed=7)
    assert a == b
    assert a["weight_decay"] in (1e-3, 1e-1)
    single = linear_probe(x, y, xt, yt, 3, max_iter=30, weight_decays=[0.5])
    assert single["weight_decay"] == 0.5


def test_balanced_accuracy_by_hand() -> None:
    target = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 0, 0, 0, 1])
    # recall(0) = 4/4, recall(1) = 1/2 -> 0.75, while top-1 would be 5/6
    assert balanced_accuracy(pred, target) == pytest.approx(0.75)
    # majority-class predictor on 8:2 data: recalls 1 and 0
    assert balanced_accuracy(torch.zeros(10, dtype=torch.long), torch.tensor([0] * 8 + [1] * 2)) == 0.5
    # classes absent from the target do not count, even when predicted
    assert balanced_accuracy(torch.tensor([2, 1, 1]), torch.tensor([0, 1, 1])) == pytest.approx(0.5)
    with pytest.raises(DataError):
        balanced_accuracy(torch.tensor([0]), torch.tensor([0, 1]))


def test_imbalanced_probe_reports_balanced_accuracy() -> None:
    threads = torch.get_num_threads()
    x, y = blobs([150, 20], 8, seed=4)
    xt, yt = blobs([60, 10], 8, seed=5)
    result = linear_probe(x, y, xt, yt, num_classes=2, max_iter=30)
    assert result["balanced_accuracy"] > 0.9 and result["top1"] > 0.9  # the minority class is found too
    assert torch.get_num_threads() == threads  # the small-problem single-thread fit restores the setting


def test_stratified_split() -> None:
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, hold = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, hold]).tolist()) == list(range(16))
    assert y[hold].tolist().count(0) == 2 and y[hold].tolist().count(1) == 1
    assert 2 not in y[hold].tolist()  # a singleton class stays in the fit part
    again = stratified_split(y, 0.2, seed=0)
    assert torch.equal(again[0], fit) and torch.equal(again[1], hold)


def test_errors() -> None:
    x, y = blobs([10, 10], 4, seed=0)
    with pytest.raises(DataError, match="2 classes"):
        linear_probe(x, torch.zeros(20, dtype=torch.long), x, y, 2)
    with pytest.raises(DataError, match="7"):
        linear_probe(x, y, x, torch.full((20,), 7), 2)
    with pytest.raises(ConfigError, match="weight_decays"):
        linear_probe(x, y, x, y, 2, weight_decays=[-1.0])


def test_fit_converges_to_scikit_learns_optimum_on_ill_conditioned_features() -> None:
    """Features of low effective rank with scales spread over four decades (as a short MAE gives): the fit must
    run to convergence, where it reaches scikit-learn's multinomial logistic regression with the same penalty;
    100 iterations (the old default) stop far above it."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    n, k, wd = 600, 6, 1e-5
    scales = torch.logspace(0, -4, k)
    latent = torch.randn(n, k, generator=g) * scales
    x = latent @ torch.randn(k, 64, generator=g) + 1e-5 * torch.randn(n, 64, generator=g)
    y = ((latent / scales) @ torch.randn(k, 10, generator=g) + 0.3 * torch.randn(n, 10, generator=g)).argmax(
        1
    )

    def objective(layer: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> float:
        with torch.no_grad():
            logits = layer((x - mean) / std)
            return float(F.cross_entropy(logits, y) + 0.5 * wd * layer.weight.pow(2).sum())

    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    reference = linear_model.LogisticRegression(C=1 / (wd * n), max_iter=100_000, tol=1e-12)
    reference.fit(z.numpy(), y.numpy())
    sk = torch.nn.Linear(64, 10)
    with torch.no_grad():
        sk.weight.copy_(torch.from_numpy(reference.coef_))
        sk.bias.copy_(torch.from_numpy(reference.intercept_))
    with torch.no_grad():
        optimum = float(F.cross_entropy(sk(z), y) + 0.5 * wd * sk.weight.pow(2).sum())
    converged = objective(*_fit(x, y, 10, wd, 1000, 1.0))
    assert converged == pytest.approx(optimum, abs=5e-3)
    assert objective(*_fit(x, y, 10, wd, 100, 1.0)) > optimum + 0.1
