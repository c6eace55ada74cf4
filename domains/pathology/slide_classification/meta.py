"""What a slide classifier carries from training to ``evaluate`` and ``heatmap``, as one typed value.

:meth:`SlideClassifierMeta.to_dict` is the only writer of a slide-classification ``task_meta``,
:meth:`SlideClassifierMeta.from_dict` its only reader (checks once, naming the file and the key): the heads'
shape, the classes in logit order, each fold's slides, and the features the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.tasks.meta import MetaReader, integer, mapping, sequence, string
from foundation_domains.pathology.slide_classification.model import HeadConfig
from foundation_domains.pathology.slide_classification.options import TASK_NAME
from foundation_domains.pathology.slide_classification.splits import Fold

SPLITS = ("train", "val", "test")


def _head(value: Any) -> HeadConfig:
    return HeadConfig(**mapping(value))


def _fold(value: Any) -> dict[str, tuple[str, ...]]:
    parts = mapping(value)
    return {k: sequence(string)(parts[k]) for k in SPLITS}


@dataclass(frozen=True)
class SlideClassifierMeta:
    """A slide classifier's folds, classes and inputs.

    Attributes:
        head: one fold's head shape (every fold's is the same).
        folds: number of fold heads in the model.
        classes: label names in logit order.
        splits: each fold's slide ids (``index`` is the fold's position).
        feature_dim: width of the tile features it takes.
        feature_backbone: fingerprint of the backbone that made the features ("" or None: not recorded).
        features, labels: the training inputs (resolved paths), for the record.
        skipped: slides left out of training, with reasons.
    """

    head: HeadConfig
    folds: int
    classes: tuple[str, ...]
    splits: tuple[Fold, ...]
    feature_dim: int
    feature_backbone: str | None = None
    features: str = ""
    labels: str = ""
    skipped: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """The stored ``task_meta`` (the keys every version wrote)."""
        return {
            "head": self.head.to_dict(),
            "folds": self.folds,
            "classes": list(self.classes),
            "splits": [f.to_dict() for f in self.splits],
            "feature_dim": self.feature_dim,
            "feature_backbone": self.feature_backbone,
            "features": self.features,
            "labels": self.labels,
            "skipped": [dict(s) for s in self.skipped],
        }

    def held_out_folds(self, slide_id: str) -> tuple[list[int], bool]:
        """The folds that score a slide and whether it was held out from them: the folds whose test split
        holds it, else every fold (held out only when no fold trained or validated on it)."""
        held = [f.index for f in self.splits if slide_id in f.test]
        if held:
            return held, True
        in_run = any(slide_id in part for f in self.splits for part in (f.train, f.val, f.test))
        return list(range(len(self.splits))), not in_run

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path) -> SlideClassifierMeta:
        """Raises: CheckpointError naming ``source`` and the missing or bad key."""
        r = MetaReader(d, source, TASK_NAME)
        splits = r.read("splits", sequence(_fold))
        return cls(
            head=r.read("head", _head),
            folds=r.read("folds", integer),
            classes=r.read("classes", sequence(string)),
            splits=tuple(Fold(i, s["train"], s["val"], s["test"]) for i, s in enumerate(splits)),
            feature_dim=r.read("feature_dim", integer),
            feature_backbone=r.read("feature_backbone", string, None),
            features=r.read("features", string, ""),
            labels=r.read("labels", string, ""),
            skipped=r.read("skipped", sequence(mapping), ()),
        )
