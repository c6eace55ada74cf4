"""SlideClassifierMeta: one writer, one reader, the folds that score a slide."""

from __future__ import annotations

import pytest

from foundation.errors import CheckpointError
from foundation_domains.pathology.slide_classification.meta import SlideClassifierMeta


def stored_meta(**kw) -> dict:
    """A slide-classification task_meta as finetune has written it."""
    meta = {
        "head": {"in_dim": 8, "n_classes": 2, "head": "abmil", "hidden": 16, "attention_dim": 8,
                 "dropout": 0.25, "instance_loss": False},
        "folds": 2,
        "classes": ["a", "b"],
        "splits": [{"train": ["s1"], "val": ["s2"], "test": ["s3"]}, {"train": ["s3"], "val": ["s2"], "test": ["s1"]}],
        "feature_dim": 8,
        "feature_backbone": "abc123",
        "features": "/data/feats",
        "labels": "/data/labels.csv",
        "skipped": [{"slide": "x", "reason": "no features"}],
    }  # fmt: skip
    meta.update(kw)
    return meta


def test_round_trip_keeps_the_stored_dict() -> None:
    meta = SlideClassifierMeta.from_dict(stored_meta(), "m.pt")
    assert meta.head.hidden == 16 and meta.classes == ("a", "b") and meta.splits[1].test == ("s1",)
    assert meta.to_dict() == stored_meta()
    assert SlideClassifierMeta.from_dict(meta.to_dict(), "m.pt") == meta


def test_the_folds_that_score_a_slide() -> None:
    meta = SlideClassifierMeta.from_dict(stored_meta(), "m.pt")
    assert meta.held_out_folds("s3") == ([0], True)
    assert meta.held_out_folds("s2") == ([0, 1], False)  # validated on by every fold: not held out
    assert meta.held_out_folds("new") == ([0, 1], True)  # another cohort: every fold scores it


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"classes": None}, "classes"),
        ({"head": {"in_dim": 8}}, "head"),
        ({"splits": [{"train": []}]}, "splits"),
    ],
)
def test_a_broken_key_is_refused_naming_the_file_and_the_key(change, key) -> None:
    with pytest.raises(CheckpointError, match=rf"broken\.pt.*'{key}'"):
        SlideClassifierMeta.from_dict(stored_meta(**change), "broken.pt")
