"""Collapse indicators: uniform and dominant-prototype targets are told apart from healthy ones."""

from __future__ import annotations

import math

import pytest
import torch

from foundation.config import RECIPES, load_config
from foundation.errors import TrainingError
from foundation.ssl.indicators import TeacherIndicators, effective_rank
from foundation.train.collapse import CollapseWatch, collapse_prone_settings


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


CONFIGS = RECIPES
OLD_SMALL_NUMBERS = [  # the first wave's tiny recipe: 1,024 prototypes, LayerScale 1e-5, teacher 0.04 -> 0.07
    "ssl.head_prototypes=1024",
    "model.layerscale_init=1e-5",
    "ssl.teacher_temp=0.07",
    "ssl.teacher_temp_warmup=0.04",
    "train.steps=300",
]


def test_collapse_prone_settings_are_named_with_their_safe_range():
    found = collapse_prone_settings(load_config(CONFIGS / "images" / "tiny.yaml", OLD_SMALL_NUMBERS), 1)
    assert len(found) == 3
    assert found[0].startswith("ssl.head_prototypes=1024 with a global batch of 16") and "<= 256" in found[0]
    assert found[1].startswith("model.layerscale_init=1e-05 in a run of 300 steps") and "null" in found[1]
    assert (
        found[2].startswith("ssl.teacher_temp=0.07 (ssl.teacher_temp_warmup=0.04)")
        and "0.01-0.04" in found[2]
    )
    # the global batch counts every rank: 16 x 4 ranks carries 1,024 prototypes
    assert not any(
        "head_prototypes" in m
        for m in collapse_prone_settings(load_config(CONFIGS / "images" / "tiny.yaml", OLD_SMALL_NUMBERS), 4)
    )


@pytest.mark.parametrize(
    "recipe",
    [
        "images/tiny",
        "images/small_dinov2",
        "pathology/tiny",
        "remote_sensing/tiny",
        "medical/dinov2_slices_tiny",
        "images/vit_small_dinov2",
        "images/vit_base_dinov2",
        "pathology/vit_large_dinov2",
        "images/small_mae",
    ],
)
def test_shipped_recipes_are_not_collapse_prone_at_their_own_scale(recipe):
    assert collapse_prone_settings(load_config(CONFIGS / f"{recipe}.yaml", []), 1) == []
