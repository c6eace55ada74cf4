"""Linear probe on frozen features: multinomial logistic regression (a ``nn.Linear`` + cross-entropy).

Features are standardised with the training mean/std, and the L2 penalty is picked from a small grid on a
stratified 20% hold-out of the training set before refitting on all of it, so the reported test accuracy
never sees the test labels. The objective is convex and solved full-batch with L-BFGS from a zero
initialisation, which is both fast on CPU and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from foundation.errors import ConfigError, DataError

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
HOLDOUT_FRACTION = 0.2
# Below this many multiply-adds per forward (N * D * C) a fit is dominated by per-op overhead, and extra
# intra-op threads only add synchronisation: with another busy process on a 2-core machine, 2 threads made
# a 2000 x 384 probe ~15x slower than 1 thread.
SINGLE_THREAD_MAX_MACS = 2**27


def balanced_accuracy(pred: Tensor, target: Tensor) -> float:
    """Mean per-class recall over the classes present in ``target``, as a fraction in ``[0, 1]``.

    Unlike top-1 it weighs every class equally, so a majority-class predictor on imbalanced data scores
    ``1 / num_present_classes`` rather than the majority share.

    Raises:
        DataError: shapes differ or ``target`` is empty.
    """
    if pred.shape != target.shape or target.ndim != 1:
        raise DataError(
            f"pred and target must be 1-D of the same length, got {tuple(pred.shape)!r} and {tuple(target.shape)!r}"
        )
    if target.numel() == 0:
        raise DataError("balanced accuracy of an empty target is undefined")
    target = target.long()
    correct = (pred.long() == target).double()
    classes, inverse = torch.unique(target, return_inverse=True)
    hits = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, correct)
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    return (hits / counts).mean().item()


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic per-class split into ``(fit_idx, holdout_idx)``.

    Each class with at least two samples gives ``round(fraction * n)`` of them (at least one, never all) to
    the hold-out; singleton classes stay in the fit part so the classifier still sees them.
    """
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_hold = 0 if len(idx) < 2 else min(max(1, round(fraction * len(idx))), len(idx) - 1)
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide), restoring it afterwards."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay finite


def _fit(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int, lr: float
) -> tuple[nn.Linear, Tensor, Tensor]:
    """Fit ``nn.Linear`` on standardised ``x``; returns the layer and the standardisation (mean, std)."""
    mean, std = _standardiser(x)
    z = (x - mean) / std
    layer = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(layer.weight)  # convex objective: zero start is as good as any, and needs no RNG
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=lr, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(z), y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * layer.weight.pow(2).sum()  # bias not penalised
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer, mean, std


def _predict(model: tuple[nn.Linear, Tensor, Tensor], x: Tensor) -> Tensor:
    layer, mean, std = model
    with torch.no_grad():
        return layer((x - mean) / std).argmax(dim=1)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    max_iter: int = 1000,
    lr: float | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and report test accuracy.

    Args:
        train_features: ``(N, D)`` features of the probe's training set.
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` features to evaluate.
        test_labels: ``(M,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes C.
        max_iter: the most L-BFGS iterations per fit (each one full-batch pass plus line search); a fit stops
            earlier once converged. Too few leaves ill-conditioned features (e.g. MAE's, of low effective
            rank) under-fitted, and the probe would then judge the optimiser rather than the features.
        lr: L-BFGS step size; None uses 1.0, right for the strong-Wolfe line search.
        weight_decays: grid of L2 penalties ``0.5 * wd * ||W||^2`` added to the mean cross-entropy.
        seed: seed of the stratified hold-out split (the fit itself has no randomness).

    Returns:
        ``{"top1", "balanced_accuracy", "weight_decay"}``: fractions in ``[0, 1]`` and the chosen penalty.

    Raises:
        ConfigError: empty or negative ``weight_decays``, or non-positive ``max_iter`` / ``lr``.
        DataError: fewer than two classes in ``train_labels``, or mismatched shapes / labels out of range.
    """
    grid = [float(w) for w in weight_decays]
    if not grid or any(w < 0 for w in grid):
        raise ConfigError(f"weight_decays={list(weight_decays)!r} must be a non-empty list of values >= 0")
    if max_iter < 1:
        raise ConfigError(f"linear probe max_iter={max_iter!r} must be >= 1")
    lr = 1.0 if lr is None else lr
    if not lr > 0:
        raise ConfigError(f"linear probe lr={lr!r} must be > 0")
    for name, feats, labels in (
        ("train", train_features, train_labels),
        ("test", test_features, test_labels),
    ):
        if feats.ndim != 2 or labels.ndim != 1 or feats.shape[0] != labels.shape[0]:
            raise DataError(
                f"{name} features/labels must be (N, D) and (N,), got {tuple(feats.shape)!r} and "
                f"{tuple(labels.shape)!r}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise DataError(f"{name} labels contain {bad!r}, outside [0, num_classes={num_classes!r})")
    if test_features.shape[1] != train_features.shape[1]:
        raise DataError(
            f"test features have dimension {test_features.shape[1]!r}, train features {train_features.shape[1]!r}"
        )
    if test_labels.numel() == 0:
        raise DataError("linear probe needs at least one test sample, got an empty test set")
    x = train_features.detach().to("cpu", torch.float32)
    y = train_labels.detach().to("cpu", torch.int64)
    present = torch.unique(y).tolist()
    if len(present) < 2:
        raise DataError(f"linear probe needs at least 2 classes in the train labels, got {present!r}")

    small = x.numel() * num_classes <= SINGLE_THREAD_MAX_MACS
    with _intra_op_threads(1 if small else torch.get_num_threads()):
        chosen = _select_weight_decay(x, y, num_classes, grid, max_iter, lr, seed)
        model = _fit(x, y, num_classes, chosen, max_iter, lr)
        pred = _predict(model, test_features.detach().to("cpu", torch.float32))
    target = test_labels.detach().to("cpu", torch.int64)
    return {
        "top1": (pred == target).double().mean().item(),
        "balanced_accuracy": balanced_accuracy(pred, target),
        "weight_decay": chosen,
    }


def _select_weight_decay(
    x: Tensor, y: Tensor, num_classes: int, grid: list[float], max_iter: int, lr: float, seed: int
) -> float:
    """The grid value with the best accuracy on a stratified hold-out (ties: the stronger penalty)."""
    chosen = grid[0]
    if len(grid) > 1:
        fit_idx, hold_idx = stratified_split(y, HOLDOUT_FRACTION, seed)
        if len(hold_idx) and len(torch.unique(y[fit_idx])) >= 2:
            best = -1.0
            for wd in sorted(grid, reverse=True):  # on ties the stronger penalty wins
                model = _fit(x[fit_idx], y[fit_idx], num_classes, wd, max_iter, lr)
                acc = (_predict(model, x[hold_idx]) == y[hold_idx]).double().mean().item()
                if acc > best:
                    best, chosen = acc, wd
        else:  # too few samples to hold any out: fall back to the strongest penalty
            chosen = max(grid)
    return chosen
