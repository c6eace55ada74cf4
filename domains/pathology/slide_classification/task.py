"""``foundation finetune slide-classification`` and ``foundation evaluate slide-classification``.

Multiple-instance learning on the tile features ``foundation embed`` wrote (one HDF5 per slide): a slide's label
(subtype, grade, mutation) comes from a bag of tiles, as in CLAM, TRIDENT and slideflow. All folds of a patient-
level cross-validation train in one run of the engine (resume, ``--nproc``, SIGTERM checkpoints as any task);
what evaluation needs (classes, head shape, each fold's slides, the features' width and backbone) is stored with
the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from foundation.config import RECIPES, Config
from foundation.errors import ConfigError
from foundation.tasks.base import TaskParts, add_config_flag
from foundation.tasks.loaded import LoadedTask
from foundation_domains.pathology.slide_classification.bags import scan_features
from foundation_domains.pathology.slide_classification.data import BagDataset, TrainSlide, collate_bags
from foundation_domains.pathology.slide_classification.labels import read_labels, sort_labels
from foundation_domains.pathology.slide_classification.loss import SlideLoss
from foundation_domains.pathology.slide_classification.matching import match
from foundation_domains.pathology.slide_classification.meta import SlideClassifierMeta
from foundation_domains.pathology.slide_classification.model import HeadConfig, SlideMIL
from foundation_domains.pathology.slide_classification.options import TASK_NAME, SlideInputs, SlideOptions
from foundation_domains.pathology.slide_classification.splits import Fold, check_folds, fixed_split, kfold
from foundation_domains.pathology.slide_classification.validation import make_validator

log = logging.getLogger(__name__)

CONFIG = RECIPES / "pathology" / "slide_mil_tiny.yaml"


def _log_skipped(skipped: list[dict[str, str]]) -> None:
    for item in skipped[:20]:
        log.warning("skipping slide %s: %s", item["slide"], item["reason"])
    if len(skipped) > 20:
        log.warning("... and %d more slides skipped", len(skipped) - 20)


def _class_weights(folds: list[Fold], labels: dict[str, int], n_classes: int) -> torch.Tensor:
    """``folds x classes``: ``n / (C n_c)`` over each fold's training slides (0 for a label it lacks)."""
    weights = torch.zeros(len(folds), n_classes)
    for k, fold in enumerate(folds):
        counts = torch.bincount(torch.tensor([labels[s] for s in fold.train]), minlength=n_classes).float()
        weights[k] = torch.where(counts > 0, len(fold.train) / (n_classes * counts.clamp(min=1)), 0.0)
    return weights


def _identity(dim: int, backbone: str, folds: list[Fold], classes: list[str]) -> dict[str, Any]:
    """What a resumed run must train on again: the features' width and backbone, the classes and the splits (a
    digest: another labels CSV or seed gives other splits)."""
    splits = json.dumps([f.to_dict() for f in folds], sort_keys=True).encode()
    return {
        "features": {"dim": dim, "backbone": backbone},
        "classes": classes,
        "splits_sha256": hashlib.sha256(splits).hexdigest()[:16],
    }


class SlideClassificationTask:
    """Slide (or patient) labels from bags of tile features: gated-attention MIL, or mean pooling."""

    name = TASK_NAME
    domain = "pathology"
    default_config = CONFIG
    options_type = SlideOptions
    inputs_type = SlideInputs
    uses_backbone = False  # trains on the features `foundation embed` made

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_flag(
            parser, "--features", "task.inputs.features", help="the --out folder of `foundation embed` (*.h5)"
        )
        add_config_flag(
            parser, "--labels", "task.inputs.labels", help="CSV: slide_id,label[,case_id][,split]"
        )

    def data_channels(self, cfg: Config) -> None:
        """No backbone is trained: the features are the data."""
        return None

    def build(self, cfg: Config, backbone: Any, backbone_meta: dict[str, Any]) -> TaskParts:
        if cfg.task.backbone or cfg.task.random_init:
            raise ConfigError(
                f"finetune {TASK_NAME} trains on features: give --features (the backbone is the one "
                "`foundation embed` used), not --backbone or --random-init"
            )
        opts: SlideOptions = cfg.task.typed_options
        inputs: SlideInputs = cfg.task.typed_inputs
        missing = [f"--{k} (task.inputs.{k})" for k in ("features", "labels") if not getattr(inputs, k)]
        if missing:
            raise ConfigError(f"finetune {TASK_NAME}: give {' and '.join(missing)}")
        table = read_labels(inputs.labels)
        folder = scan_features(inputs.features)
        matched = match(table, folder)
        _log_skipped(matched.skipped)
        if not matched.rows:
            raise ConfigError(f"no slide of {table.path} has a usable feature file in {inputs.features}")
        classes = sort_labels({r.label for r in matched.rows})
        if len(classes) < 2:
            raise ConfigError(
                f"{table.path}: the slides with features have one label ({classes[0]!r}); need 2+"
            )
        if table.has_split:
            log.info("%s has a split column: one fold from it (task.options.folds not used)", table.path)
            folds = fixed_split(matched.rows)
        else:
            folds = kfold(matched.rows, opts.folds, cfg.seed, opts.val_fraction)
        for warning in check_folds(folds, {r.slide_id: r.label for r in matched.rows}, classes):
            log.warning("%s: its metrics cover the other labels", warning)
        index = {c: i for i, c in enumerate(classes)}
        label_of = {r.slide_id: index[r.label] for r in matched.rows}
        path_of = {s: b.path for s, b in matched.bags.items()}
        head = HeadConfig(
            in_dim=folder.dim, n_classes=len(classes), head=opts.head, hidden=opts.hidden,
            attention_dim=opts.attention_dim, dropout=opts.dropout, instance_loss=opts.instance_loss,
        )  # fmt: skip
        net = SlideMIL(head, len(folds))
        weights = _class_weights(folds, label_of, len(classes)) if opts.balance == "weights" else None
        loss = SlideLoss(weights, opts.instance_weight if opts.instance_loss else 0.0, opts.instance_k)
        dataset = BagDataset(
            [[TrainSlide(path_of[s], label_of[s]) for s in fold.train] for fold in folds],
            cfg.seed, max_tiles=opts.max_tiles, balanced=opts.balance == "sampling",
        )  # fmt: skip
        validate = make_validator([[(path_of[s], label_of[s]) for s in f.val] for f in folds], opts.patience)
        if validate is None:
            log.warning("no validation slides: no early stopping, the last weights are kept")
        cases = {r.slide_id: r.case_id for r in matched.rows}
        log.info(
            "%s: %d slides (%d cases), %d classes, %d fold(s), %d-wide features",
            TASK_NAME, len(matched.rows), len(set(cases.values())), len(classes), len(folds), folder.dim,
        )  # fmt: skip
        meta = SlideClassifierMeta(
            head=head,
            folds=len(folds),
            classes=tuple(classes),
            splits=tuple(folds),
            feature_dim=folder.dim,
            feature_backbone=folder.backbone,
            features=str(Path(inputs.features).resolve()),
            labels=str(table.path.resolve()),
            skipped=tuple(matched.skipped),
        )
        return TaskParts(
            net=net,
            loss=loss,
            dataset=dataset,
            collate=collate_bags,
            validate=validate,
            meta=meta,
            input_key=("features", "mask", "fold"),
            inputs_identity=_identity(folder.dim, folder.backbone, folds, classes),
        )

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="RUN folder, RUN/model.pt or a checkpoint")
        parser.add_argument("--features", required=True, help="the --out folder of `foundation embed` (*.h5)")
        parser.add_argument("--labels", required=True, help="CSV: slide_id,label[,case_id][,split]")
        parser.add_argument(
            "--out",
            help="predictions CSV (slide, case, fold, label, probabilities); default RUN/predictions.csv; an "
            "existing file is replaced only if this command wrote it",
        )
        parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
        parser.add_argument(
            "--heatmaps",
            help="also DIR/<slide>.png per scored slide: attention percentiles over the tiles, on the slide's "
            "thumbnail when the slide can be opened (DIR new, empty or holding only heatmaps of ours)",
        )

    def load(self, path: str | Path) -> LoadedTask[SlideClassifierMeta]:
        """The fold networks (eval mode) and their :class:`SlideClassifierMeta`; see
        :func:`.evaluate.load_slide_classifier`."""
        from foundation_domains.pathology.slide_classification.evaluate import load_slide_classifier

        return load_slide_classifier(path)

    def evaluate(self, args: argparse.Namespace) -> dict[str, Any]:
        from foundation_domains.pathology.slide_classification.evaluate import evaluate_run

        return evaluate_run(args)
