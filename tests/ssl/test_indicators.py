"""Collapse indicators: uniform and dominant-prototype targets are told apart from healthy ones."""

from __future__ import annotations

import math

import pytest
import torch

from foundation.errors import TrainingError
from foundation.ssl.indicators import TeacherIndicators, effective_rank
from foundation.train.collapse import CollapseWatch


def test_uniform_dominant_and_healthy_targets():
    k, b = 64, 32
    feats = torch.randn(b, 16, generator=torch.Generator().manual_seed(0))
    uniform = TeacherIndicators.measure(torch.full((b, k), 1 / k), feats)
    assert uniform.collapse() == "uniform" and uniform.entropy == pytest.approx(math.log(k), rel=1e-5)
    dominant = TeacherIndicators.measure(torch.nn.functional.one_hot(torch.zeros(b).long(), k).float(), feats)
    assert dominant.collapse() == "dominant" and dominant.max_prob == pytest.approx(1.0)
    healthy = TeacherIndicators.measure(torch.nn.functional.one_hot(torch.arange(b) % k, k).float(), feats)
    assert healthy.collapse() is None and healthy.as_metrics()["collapsed"] == 0.0


def test_effective_rank_of_constant_and_spread_features():
    assert effective_rank(torch.ones(8, 4)) == 1.0
    spread = effective_rank(torch.eye(16))
    assert 14.0 < spread <= 16.0


def test_collapse_is_reported_once_after_patience_and_can_stop(caplog):
    watch = CollapseWatch(patience=3, stop=False)
    collapsed = {"collapsed": 1.0, "teacher_entropy": 6.9, "ln_k": 6.93}
    events = [watch.update(s, collapsed) for s in range(5)]
    assert events[:2] == [None, None] and events[2]["collapse_warning"] == 1.0 and events[3:] == [None, None]
    assert "collapsed for 3 steps" in caplog.text
    assert watch.update(5, {"collapsed": 0.0}) == {"collapse_ended": 1.0}
    stopping = CollapseWatch(patience=2, stop=True)
    stopping.update(0, collapsed)
    with pytest.raises(TrainingError, match="stop_on_collapse"):
        stopping.update(1, collapsed)
    assert CollapseWatch(2, False).update(0, {"loss": 1.0}) is None  # MAE reports no indicators
