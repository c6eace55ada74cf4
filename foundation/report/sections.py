"""The sections of a run report, each built from the run's metrics, config and weights on its own: a section
that cannot be drawn (no such metric, data moved away) says why and the rest of the page is still made."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from foundation.errors import FoundationError
from foundation.report.html import Picture, Section
from foundation.report.plots import Panel, line_plot
from foundation.report.runlog import RunLog

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "dino", "ibot", "koleo", "mse", "mae")
SCHEDULE_KEYS = (("lr", "learning rate"), ("wd", "weight decay"), ("momentum", "teacher momentum"),
                 ("teacher_temp", "teacher temperature"))  # fmt: skip
COLLAPSE_KEYS = ("teacher_entropy", "teacher_batch_entropy", "teacher_max_prob", "cls_rank", "collapsed")
CROP_SAMPLES = 4
MAX_RUN_PICTURES = 24


def _missing(what: str, keys: tuple[str, ...] | str) -> str:
    names = keys if isinstance(keys, str) else ", ".join(keys)
    return f"No {what} in this run's metrics.jsonl (looked for {names})."


def losses(log_: RunLog) -> Section:
    total = log_.get("loss")
    parts = log_.get(*LOSS_KEYS[1:]) + [
        s for k, s in sorted(log_.series.items()) if "loss" in k and k != "loss" and not k.startswith("val/")
    ]
    if not total and not parts:
        return Section("losses", "Loss components", _missing("losses", LOSS_KEYS))
    png = line_plot("losses", [Panel("total loss", tuple(total)), Panel("components", tuple(parts))])
    return Section("losses", "Loss components", "Training loss and its components per logged step.",
                   (Picture("losses.png", "total loss and its components over steps", png),))  # fmt: skip


def schedules(log_: RunLog) -> Section:
    panels = [Panel(title, tuple(log_.get(key))) for key, title in SCHEDULE_KEYS]
    if not any(p.series for p in panels):
        return Section("schedules", "Schedules", _missing("schedules", tuple(k for k, _ in SCHEDULE_KEYS)))
    png = line_plot("schedules", panels)
    return Section("schedules", "Schedules", "Learning rate, weight decay, teacher momentum and temperature.",
                   (Picture("schedules.png", "lr / weight decay / momentum / teacher temperature", png),))  # fmt: skip


def throughput(log_: RunLog) -> Section:
    panels = [Panel("throughput", tuple(log_.get("img_s")), "images / s"),
              Panel("gradient norm (before clipping)", tuple(log_.get("grad_norm")), log_y=True)]  # fmt: skip
    if not any(p.series for p in panels):
        return Section("throughput", "Throughput", _missing("throughput", ("img_s", "grad_norm")))
    if log_.get("threads"):  # CPU runs: the count the thread tuner chose, step by step
        panels.append(Panel("intra-op threads", tuple(log_.get("threads"))))
    png = line_plot("throughput", panels)
    return Section("throughput", "Throughput", "Images per second on the main rank; gradient norm; CPU threads.",
                   (Picture("throughput.png", "throughput and gradient norm over steps", png),))  # fmt: skip


def knn(log_: RunLog) -> Section:
    series = tuple(s for k, s in sorted(log_.series.items()) if "knn" in k.lower())
    if not series:
        return Section("knn", "kNN accuracy", _missing("kNN accuracy", "keys containing 'knn'"))
    png = line_plot("kNN over steps", [Panel("kNN", series, "accuracy")], columns=1)
    last = ", ".join(f"{s.key} {s.last:.4g} (step {s.steps[-1]})" for s in series)
    return Section("knn", "kNN accuracy", f"Latest: {last}.", (Picture("knn.png", "kNN over steps", png),))


def collapse(log_: RunLog) -> Section:
    ln_k = log_.get("ln_k")
    ref = ((ln_k[0].last, "ln K (uniform target)"),) if ln_k else ()
    panels = [
        Panel("teacher entropy", tuple(log_.get("teacher_entropy", "teacher_batch_entropy")), "nats", ref),
        Panel("teacher max probability", tuple(log_.get("teacher_max_prob"))),
        Panel("CLS effective rank", tuple(log_.get("cls_rank"))),
        Panel("collapsed step (1 = yes)", tuple(log_.get("collapsed"))),
    ]
    warnings = [e for e in log_.events if "collapse_warning" in e]
    note = "Teacher entropy near ln K: uniform targets; batch entropy near 0: every image on the same prototypes."
    if warnings:
        note += " Collapse warnings: " + "; ".join(
            f"step {e['step']}: {e['collapse_warning']}" for e in warnings
        )
    if not any(p.series for p in panels):
        return Section("collapse", "Collapse indicators", _missing("collapse indicators", COLLAPSE_KEYS))
    png = line_plot("collapse indicators", panels)
    return Section("collapse", "Collapse indicators", note,
                   (Picture("collapse.png", "collapse indicators over steps", png),))  # fmt: skip


def validation(log_: RunLog) -> Section:
    series = log_.prefixed("val/")
    if not series:
        return Section("validation", "Validation metrics", _missing("validation metrics", "val/*; task runs "
                       "log them with train.eval_every=N"))  # fmt: skip
    png = line_plot("validation", [Panel(s.key, (s,)) for s in series])
    rows = (("metric", "last value", "step"),) + tuple(
        (s.key, f"{s.last:.5g}", str(s.steps[-1])) for s in series
    )
    return Section("validation", "Validation metrics", "A task run's validation metrics over steps.",
                   (Picture("validation.png", "validation metrics over steps", png),), rows)  # fmt: skip


def crops_and_pca(run: Path, pretraining: bool, device: torch.device) -> tuple[Section, Section]:
    """The crop grid (from the run's config and data) and the PCA / attention of the backbone on them."""
    if not pretraining:
        note = "A task run: its inputs are the task's, not SSL crops; see `foundation visualize`."
        return Section("crops", "Crop grid", note), Section("pca", "PCA of patch features", note)
    from foundation.export import load_backbone
    from foundation.report.crops import crop_grid, draw_crops, first_views
    from foundation.visualize.pipeline import fit, overview, see

    try:
        samples = draw_crops(run, CROP_SAMPLES)
    except Exception as e:  # the rest of the page does not depend on the data still being there
        log.warning("report: crops not drawn: %s", e)
        why = (
            f"Not drawn: {e}"
            if isinstance(e, (FoundationError, OSError))
            else f"Not drawn: {type(e).__name__}: {e}"
        )
        return Section("crops", "Crop grid", why), Section("pca", "PCA of patch features", why)
    crops = Section("crops", "Crop grid", "Views drawn from the run's data with its own augmentations and seed.",
                    (Picture("crops.png", "global and local crops, one row per sample", crop_grid(samples)),))  # fmt: skip
    try:
        backbone, meta = load_backbone(run)
        seen = see(backbone.eval().to(device), first_views(samples), mean=meta.get("mean"), std=meta.get("std"),
                   device=device)  # fmt: skip
        pca = fit(seen)
        png = overview(seen, pca, f"backbone {Path(meta['source']).name}: first global crop of each sample")
    except Exception as e:  # e.g. a run without export or checkpoint yet
        log.warning("report: PCA not drawn: %s", e)
        return crops, Section("pca", "PCA of patch features", f"Not drawn: {e}")
    note = (
        "First three PCA components of the patch tokens (one fit over these crops"
        + (", background removed)" if pca.background_removed else ")")
        + " and the last block's CLS attention, mean of heads."
    )
    return crops, Section(
        "pca", "PCA of patch features", note, (Picture("pca.png", "PCA and CLS attention", png),)
    )


def _first_and_last(found: list[Path]) -> list[Path]:
    """Per series (``NAME_stepNNN.png``, as online monitoring writes them) its first and latest picture; other
    PNGs as they are. Names sort by step (zero-padded), so a long run does not fill the page."""
    series: dict[tuple[Path, str], list[Path]] = {}
    for p in found:
        stem, sep, _ = p.stem.rpartition("_step")
        series.setdefault((p.parent, stem if sep else p.stem + "\0"), []).append(p)
    kept = []
    for group in series.values():
        kept += [group[0]] if len(group) == 1 else [group[0], group[-1]]
    return sorted(kept)


def run_pictures(run: Path, skip: Path) -> Section:
    """PNGs the run itself wrote (e.g. online monitoring's crops and PCA), one folder deep."""
    found = sorted(p for p in [*run.glob("*.png"), *run.glob("*/*.png")] if skip not in p.parents)
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(run).parts)]
    if not found:
        return Section("pictures", "Pictures in the run folder", "No PNG in the run folder.")
    shown = _first_and_last(found)[:MAX_RUN_PICTURES]
    pictures = tuple(Picture(p.name, str(p.relative_to(run)), p.read_bytes()) for p in shown)
    note = f"{len(found)} PNG(s) the run wrote; of each series (NAME_stepN) the first and the latest."
    return Section("pictures", "Pictures in the run folder", note, pictures)


def config(run: Path) -> Section:
    path = run / "config.yaml"
    if not path.is_file():
        return Section("config", "Resolved config", f"{path} is missing.")
    return Section(
        "config", "Resolved config", f"{path}: enough to re-run this run alone.", pre=path.read_text()
    )


def environment() -> Section:
    from foundation.info import environment_info

    info = environment_info()
    return Section("environment", "Environment", "This machine when the report was written (versions, devices).",
                   pre=json.dumps(info, indent=2))  # fmt: skip


def last_values(log_: RunLog) -> Section:
    rows = [("metric", "last value", "at step", "logged")]
    for key, s in sorted(log_.series.items()):
        value = f"{s.last:.5g}" if math.isfinite(s.last) else str(s.last)
        rows.append((key, value, str(s.steps[-1]), str(len(s.steps))))
    return Section("metrics", "Last values", "Every numeric metric of metrics.jsonl.", table=tuple(rows))
