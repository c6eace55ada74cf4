"""``foundation evaluate slide-classification``: each fold's model on the slides it never trained or validated on.

A slide is scored by fold ``k`` when it was in fold ``k``'s test split, or is new to the run (another cohort:
then every fold scores it). Bags are read one at a time and evaluated whole, so memory does not grow with the
number of slides. Per fold: AUROC, balanced accuracy and weighted F1 with bootstrap 95% intervals; the top-level
values are their means over folds (``*_std`` beside them); a metric undefined on a fold (AUROC of a fold whose
held-out slides have one label) is null there and left out of the mean.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from foundation.errors import ConfigError, DataError, OutputError
from foundation.outputs import write_verified
from foundation.tasks.loaded import LoadedTask, load_task_model
from foundation.train.distributed import resolve_device
from foundation_domains.pathology.slide_classification.bags import read_bag, scan_features
from foundation_domains.pathology.slide_classification.heatmap import check_heatmap_dir, write_heatmap
from foundation_domains.pathology.slide_classification.inference import run_bag
from foundation_domains.pathology.slide_classification.labels import read_labels
from foundation_domains.pathology.slide_classification.matching import match
from foundation_domains.pathology.slide_classification.meta import SlideClassifierMeta
from foundation_domains.pathology.slide_classification.metrics import METRICS, scores
from foundation_domains.pathology.slide_classification.model import SlideMIL
from foundation_domains.pathology.slide_classification.options import TASK_NAME

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("slide", "case", "fold", "label")


def load_slide_classifier(checkpoint: str | Path) -> LoadedTask[SlideClassifierMeta]:
    """The fold networks (eval mode) and the :class:`SlideClassifierMeta` of a ``finetune slide-classification``
    model (``SlideClassificationTask.load``).

    Raises:
        CheckpointError: unreadable, another task's model, broken metadata, or weights that do not fit.
    """

    def build(_: dict[str, Any], meta: SlideClassifierMeta) -> SlideMIL:
        return SlideMIL(meta.head, meta.folds)

    return load_task_model(checkpoint, TASK_NAME, SlideClassifierMeta.from_dict, build)


def _check_features(meta: SlideClassifierMeta, dim: int, backbone: str, folder: str) -> None:
    if dim != meta.feature_dim:
        raise ConfigError(
            f"--features {folder!r} holds {dim}-wide features; the model was trained on {meta.feature_dim}-wide "
            "ones: embed the slides with the backbone used for training"
        )
    if backbone and meta.feature_backbone and backbone != meta.feature_backbone:
        raise ConfigError(
            f"--features {folder!r} come from backbone {backbone[:12]!r}, the model was trained on features of "
            f"{meta.feature_backbone[:12]!r}: embed the slides with the backbone used for training"
        )


def _is_our_predictions(path: Path) -> bool:
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(header[:4]) == PREDICTION_COLUMNS and all(h.startswith("prob_") for h in header[4:])


def _check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse an input, a folder, or a file that is not an earlier predictions CSV of ours."""
    resolved = out.resolve()
    for path in inputs:
        if resolved == path.resolve():
            raise OutputError(f"--out {str(out)!r} is an input of this command; give another file")
    if out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a folder; give a file name")
    if out.exists() and not _is_our_predictions(out):
        raise OutputError(
            f"--out {str(out)!r} exists and is not a predictions CSV of ours; it was left as it is"
        )
    if not out.parent.is_dir():
        raise OutputError(f"the folder of --out {str(out)!r} does not exist")


def _write_predictions(out: Path, classes: list[str], rows: list[list[Any]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*PREDICTION_COLUMNS, *(f"prob_{c}" for c in classes)])
    writer.writerows(rows)
    data = text.getvalue()

    def verify(tmp: Path) -> None:
        if tmp.read_text() != data:
            raise OutputError(f"{out}: read back differs from what was written")

    write_verified(out, lambda tmp: tmp.write_text(data), verify)


def _summary(per_fold: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard deviation over folds of each metric (folds where it is undefined left out)."""
    out = {}
    for name in METRICS:
        values = [f[name] for f in per_fold if not math.isnan(f[name])]
        out[name] = float(np.mean(values)) if values else math.nan
        out[f"{name}_std"] = float(np.std(values)) if values else math.nan
    return out


def _heatmap(folder: Path, feature_file: Path, slide: str, attention: np.ndarray) -> int:
    """Draw one slide's heatmap (mean attention of the folds that scored it); a failure is logged, not fatal."""
    try:
        write_heatmap(folder / f"{slide}.png", feature_file, attention, f"{slide}: attention percentiles")
    except (DataError, OutputError) as e:
        log.warning("no heatmap for %s: %s", slide, e)
        return 0
    return 1


def _json_safe(value: Any) -> Any:
    """NaN (a metric undefined on a fold, e.g. AUROC with one class) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """See the module docstring. The result holds ``done`` (slides scored) and ``skipped`` (the others, with
    reasons), from which the CLI derives the exit status.

    Raises:
        CheckpointError, ConfigError, OutputError: refused before any work; DataError: no slide could be scored.
    """
    model = load_slide_classifier(args.checkpoint)
    net, meta = model.net, model.meta
    out = Path(args.out) if args.out else model.run_dir / "predictions.csv"
    _check_out(out, [Path(args.labels), Path(args.checkpoint)])
    heatmaps = Path(args.heatmaps) if getattr(args, "heatmaps", None) else None
    if heatmaps is not None:
        check_heatmap_dir(heatmaps, [Path(args.features), Path(args.labels), Path(args.checkpoint)])
    table = read_labels(args.labels)
    folder = scan_features(args.features)
    _check_features(meta, folder.dim, folder.backbone, args.features)
    classes = list(meta.classes)
    matched = match(table, folder, known_labels=classes)
    splits = meta.splits
    device = resolve_device(getattr(args, "device", "auto"))
    net.to(device).eval()
    index = {c: i for i, c in enumerate(classes)}
    per_fold: list[dict[str, list]] = [{"labels": [], "probs": []} for _ in splits]
    rows, skipped, not_held_out, drawn = [], list(matched.skipped), [], 0
    if heatmaps is not None:
        heatmaps.mkdir(exist_ok=True)
    for row in tqdm(matched.rows, desc=TASK_NAME, unit="slide", disable=getattr(args, "quiet", False)):
        folds, held_out = meta.held_out_folds(row.slide_id)
        if not held_out:  # trained or validated on by every fold that could score it
            not_held_out.append(row.slide_id)
            continue
        try:
            features = read_bag(matched.bags[row.slide_id].path)
        except DataError as e:
            skipped.append({"slide": row.slide_id, "reason": str(e)})
            continue
        attention = []
        for k in folds:
            result = run_bag(net.head_for_inference(k), features, device)
            # kept as Python floats: a small tensor kept per slide would pin glibc's heap above the freed bag
            # (RSS then grows by a bag's temporaries with every slide)
            probs = result["probs"].tolist()
            if heatmaps is not None:
                attention.append(result["attention"].numpy())
            per_fold[k]["labels"].append(index[row.label])
            per_fold[k]["probs"].append(probs)
            rows.append([row.slide_id, row.case_id, k, row.label, *(f"{p:.6g}" for p in probs)])
        del features
        if heatmaps is not None:
            drawn += _heatmap(heatmaps, matched.bags[row.slide_id].path, row.slide_id, np.mean(attention, 0))
    done = len({r[0] for r in rows})
    if not done:
        first = f" (first skipped: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"no slide could be scored: none is held out from training in {args.labels}{first}")
    results = []
    for k, fold in enumerate(per_fold):
        if not fold["labels"]:
            continue
        y, p = np.array(fold["labels"]), np.array(fold["probs"], np.float64)
        results.append({"fold": k, **scores(y, p, bootstrap=args.bootstrap, seed=k)})
    _check_out(out, [Path(args.labels), Path(args.checkpoint)])  # again: it may have appeared meanwhile
    _write_predictions(out, classes, rows)
    if not_held_out:
        log.info(
            "%d slide(s) were trained or validated on by every fold and are not scored", len(not_held_out)
        )
    if skipped:
        log.warning(
            "%d slide(s) skipped (first: %s); the metrics are over the others",
            len(skipped),
            skipped[0]["reason"],
        )
    return _json_safe(
        {
            "checkpoint": str(args.checkpoint),
            **_summary(results),
            "folds": results,
            "classes": classes,
            "predictions": str(out),
            **({"heatmaps": str(heatmaps), "heatmaps_drawn": drawn} if heatmaps is not None else {}),
            "not_held_out": len(not_held_out),
            "done": done,
            "skipped": skipped,
        }
    )
