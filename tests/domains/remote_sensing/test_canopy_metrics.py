"""Canopy-height metrics and masked losses against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from foundation.errors import ConfigError
from foundation_domains.remote_sensing.canopy.losses import (
    CanopyLoss,
    LossOptions,
    expected_height,
    height_to_bin,
    masked_bins_loss,
    masked_regression_loss,
)
from foundation_domains.remote_sensing.canopy.metrics import CanopyMetrics, block_means, scalar_metrics

NAN = float("nan")


# -- metrics -----------------------------------------------------------------------------------------------
def test_pixel_metrics_by_hand():
    m = CanopyMetrics()
    m.add(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[2.0, 2.0], [NAN, 0.0]]))
    r = m.compute()
    # valid pairs (pred, label): (1, 2), (2, 2), (4, 0) -> errors -1, 0, 4
    assert r["pixels"] == 3
    assert r["mae"] == pytest.approx(5 / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(17 / 3))
    assert r["bias"] == pytest.approx(1.0)
    # labels 2, 2, 0: mean 4/3, SS_tot = 2 (2/3)^2 + (4/3)^2 = 24/9; SS_res = 1 + 0 + 16 = 17
    assert r["r2"] == pytest.approx(1 - 17 / (24 / 9))
    # tree cover (>= 2 m): pred T at (2, 2) and (4, 0); label T at (1, 2) and (2, 2): 1 / 3
    assert r["tree_cover_iou"] == pytest.approx(1 / 3)
    bins = {b["range"]: b for b in r["height_bins"]}
    assert list(bins) == ["0-2", "2-5", "5-10", "10-15", "15-20", "20-30", "30-60", ">=60"]
    assert bins["0-2"] == {"range": "0-2", "count": 1, "mae": 4.0, "bias": 4.0, "error_std": 0.0}
    assert bins["2-5"] == {"range": "2-5", "count": 2, "mae": 0.5, "bias": -0.5, "error_std": 0.5}
    assert bins["30-60"] == {"range": "30-60", "count": 0, "mae": None, "bias": None, "error_std": None}
    json.dumps(r, allow_nan=False)  # valid JSON: undefined values are null, never NaN


def test_heights_on_bin_edges_and_outside_the_range():
    m = CanopyMetrics()
    m.add(np.zeros((1, 4)), np.array([[-0.5, 60.0, 100.0, 5.0]]))
    counts = {b["range"]: b["count"] for b in m.compute()["height_bins"]}
    assert counts["0-2"] == 1 and counts[">=60"] == 2 and counts["5-10"] == 1


def test_accumulating_images_equals_one_big_image():
    rng = np.random.default_rng(0)
    preds = [rng.uniform(0, 30, (20, 30)) for _ in range(3)]
    labels = [rng.uniform(0, 30, (20, 30)) for _ in range(3)]
    labels[1][:5] = NAN
    one, many = CanopyMetrics(block=10), CanopyMetrics(block=10)
    for p, y in zip(preds, labels, strict=True):
        many.add(p, y)
    one.add(np.concatenate(preds, axis=1), np.concatenate(labels, axis=1))
    a, b = one.compute(), many.compute()
    for key in ("pixels", "mae", "rmse", "r2", "bias", "tree_cover_iou", "block_r2", "blocks"):
        assert a[key] == pytest.approx(b[key]), key
    assert b["images"] == 3


def test_block_means_by_hand():
    values = np.arange(16, dtype=float).reshape(4, 4)
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    means, ok = block_means(values, valid, block=2)
    assert means.tolist() == [[(1 + 4 + 5) / 3, 4.5], [10.5, 12.5]]
    assert ok.all()
    # a 3 x 3 image in 2-px blocks: partial edge blocks count when half of their own pixels are valid
    valid = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    means, ok = block_means(np.ones((3, 3)), valid, block=2)
    assert ok.tolist() == [[True, False], [False, True]]


def test_block_r2_by_hand():
    # 4 x 4 image, 2 x 2 blocks: label block means 0, 1, 2, 3; prediction block means 0, 1, 2, 5
    label = np.kron(np.array([[0.0, 1.0], [2.0, 3.0]]), np.ones((2, 2)))
    pred = np.kron(np.array([[0.0, 1.0], [2.0, 5.0]]), np.ones((2, 2)))
    pred[0, 0], pred[0, 1] = -1.0, 1.0  # same block mean, different pixels
    m = CanopyMetrics(block=2)
    m.add(pred, label)
    r = m.compute()
    # SS_tot = 2.25 + 0.25 + 0.25 + 2.25 = 5; SS_res = 4
    assert r["blocks"] == 4
    assert r["block_r2"] == pytest.approx(1 - 4 / 5)


def test_undefined_metrics_are_none():
    m = CanopyMetrics()
    m.add(np.zeros((3, 3)), np.full((3, 3), NAN))
    r = m.compute()
    assert r["pixels"] == 0 and r["mae"] is None and r["r2"] is None and r["tree_cover_iou"] is None
    m.add(np.zeros((2, 2)), np.full((2, 2), 7.0))  # constant label: R^2 undefined
    r = m.compute()
    assert r["mae"] == 7.0 and r["r2"] is None
    assert scalar_metrics(r) == {"mae": 7.0, "rmse": 7.0, "bias": -7.0, "tree_cover_iou": 0.0}


# -- losses ------------------------------------------------------------------------------------------------
def test_masked_regression_losses_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    target = torch.tensor([2.0, NAN, 5.0])
    assert masked_regression_loss(pred, target, "l1").item() == pytest.approx((1 + 2) / 2)
    # Huber, delta 1: |d| = 1 -> 0.5; |d| = 2 -> 2 - 0.5 = 1.5
    loss = masked_regression_loss(pred, target, "huber", delta=1.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([-0.5, 0.0, -0.5])  # nothing from the NaN label


def test_an_all_masked_batch_gives_zero_with_a_gradient_path():
    out = torch.randn(2, 4, 3, 3, requires_grad=True)
    batch = {"height": torch.full((2, 1, 3, 3), NAN)}
    for mode in ("bins", "regression"):
        x = out if mode == "bins" else out[:, :1].abs()
        loss = CanopyLoss(mode, LossOptions(), torch.linspace(0, 96, 4))(x, batch)
        assert loss["loss"].item() == 0.0 and float(loss["valid"]) == 0.0
        out.grad = None
        loss["loss"].backward()
        assert out.grad is not None and torch.isfinite(out.grad).all() and not out.grad.any()


def test_bins_by_hand():
    centers = torch.linspace(0, 96, 5)  # 0, 24, 48, 72, 96
    assert height_to_bin(torch.tensor([0.0, 11.0, 13.0, 100.0, -3.0]), centers).tolist() == [0, 0, 1, 4, 0]
    logits = torch.zeros(1, 5, 1, 2)
    target = torch.tensor([[[[30.0, NAN]]]])
    assert float(masked_bins_loss(logits, target, centers)) == pytest.approx(math.log(5))
    assert expected_height(logits, centers).flatten().tolist() == pytest.approx([48.0, 48.0])
    # cross-entropy + 0.5 x L1 of the expectation: log 5 + 0.5 x |48 - 30|
    loss = CanopyLoss("bins", LossOptions(l1_weight=0.5), centers)(logits, {"height": target})
    assert float(loss["loss"]) == pytest.approx(math.log(5) + 9.0)
    assert float(loss["mae"]) == pytest.approx(18.0)
    assert float(loss["valid"]) == pytest.approx(0.5)


def test_loss_options_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"task\.options\.loss\.kind"):
        LossOptions.from_options({"kind": "l2"})
    with pytest.raises(ConfigError, match="'l2'"):
        LossOptions.from_options({"regression": "l2"})
