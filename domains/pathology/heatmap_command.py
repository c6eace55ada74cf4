"""``foundation heatmap``: per slide, a PNG of attention (or a class's probability) over the slide with a colour
bar, and a GeoJSON of the tiles with their scores that QuPath opens.

Built on ``slide_classification``: the model of ``finetune slide-classification`` (each fold's best weights),
the feature files of ``embed`` (tiles placed by ``coords`` and ``patch_size_level0``), the drawing of
``heatmap.py`` (also used by ``evaluate --heatmaps``) and the tile scores of ``tile_scores.py``. A slide is scored
by the folds that held it out (a slide new to the run: every fold; the mean over them); a slide every fold
trained or validated on is still drawn, by every fold, and marked ``held_out: false``.

Batch rules as ``embed``: a broken feature file (or one of another width or backbone than the model's), or a
slide the ``--slides-csv`` names without features, is skipped and reported; a PNG/GeoJSON pair half written by a
stopped run is finished; outputs are written under temporary names, read back and renamed; a slide whose two files
are ours and were made from the same model, features and score is complete; another file of ours is replaced
only with ``--overwrite``; a file that is not ours is never replaced. ``OUT/summary.json``; exit status 0 all
done, 2 some skipped, 1 none done.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module; torch and the model come only when a heatmap is drawn
    from foundation_domains.pathology.slide_classification.meta import SlideClassifierMeta

log = logging.getLogger(__name__)

SCORES = ("attention", "class")


def add_heatmap_command(subparsers: argparse._SubParsersAction) -> None:
    """``heatmap``: attention / class heatmaps (PNG) and tile scores (GeoJSON for QuPath) per slide."""
    p = subparsers.add_parser(
        "heatmap",
        help="per slide: attention or class-score heatmap (PNG with colour bar) and tile GeoJSON for QuPath",
        description="For each feature file of --features: OUT/<slide>.png (the tiles' attention percentile, or "
        "with --score class a class's probability, over the slide's thumbnail, with a colour bar) and "
        "OUT/<slide>.geojson (one square per tile in level-0 pixels with measurements attention, "
        "attention_percentile and prob_<class>; QuPath: drag it onto the slide or File > Import objects), and "
        "OUT/summary.json. A broken feature file is skipped and listed; the rest are drawn. Exit status: 0 every "
        "slide done, 2 some skipped, 1 none done.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="RUN folder of `finetune slide-classification`, or its model"
    )
    p.add_argument("--features", required=True, help="the --out folder of `foundation embed` (*.h5)")
    p.add_argument(
        "--slides",
        help="folder (or list file) of the slides, for the thumbnails; default: the slide each feature file "
        "records. A slide that cannot be found or opened is drawn on white (the summary says why)",
    )
    p.add_argument("--out", required=True, help="folder for the PNGs, GeoJSONs and summary.json")
    p.add_argument(
        "--score",
        choices=SCORES,
        default="attention",
        help="attention (percentile within the slide, CLAM's convention) or class (each tile's probability "
        "of --class; default the slide's predicted class)",
    )
    p.add_argument(
        "--class", dest="class_name", help="with --score class: the class drawn (default: predicted)"
    )
    p.add_argument(
        "--slides-csv",
        help="CSV of the slides to draw (column slide_id, slide or path; CLAM's process_list): names matched "
        "to the feature files' names, those without one reported",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redraw earlier heatmaps of ours made otherwise (never replaces files that are not ours)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.set_defaults(func=run_heatmap)


@dataclass(frozen=True)
class Settings:
    """What every slide's drawing shares."""

    out: Path
    score: str
    class_name: str | None
    classes: list[str]
    model_key: str
    overwrite: bool


def _feature_ids(names: list[str], ids: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The slide ids (feature file stems) a slide list names: by the name itself, the relative or absolute path
    whose folders ``embed`` joined with ``__`` (the longest match first, so ``case1/a.svs`` is ``case1__a``, not
    the ``a`` of another folder's ``a.svs``), the file name or the stem."""
    known = set(ids)
    chosen, missing = [], []
    for name in names:
        path = Path(name)
        parts = [p for p in (path.parent / path.stem).parts if p not in (path.anchor, "", ".")]
        ends = (parts[-1], path.name) if parts else ()
        joined = ["__".join([*parts[i:-1], end]) for i in range(len(parts)) for end in ends]
        candidates = [name, *joined, path.name, path.stem]
        hit = next((c for c in candidates if c in known), None)
        if hit is None:
            missing.append({"slide": name, "reason": f"{name!r} of the slide list has no feature file"})
        elif hit not in chosen:
            chosen.append(hit)
    return chosen, missing


def _scan(features: str, meta: SlideClassifierMeta) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The feature files of ``features`` this model can score, by slide id, and the others with their reason
    (unreadable, or another width or backbone than the model was trained on: one such file is skipped, the rest
    drawn).

    Raises:
        ConfigError: ``features`` is not a folder, or holds no file the model can score (the first reason shown).
    """
    from foundation.errors import ConfigError, DataError
    from foundation_domains.pathology.slide_classification.bags import look_bag

    folder = Path(features)
    if not folder.is_dir():
        raise ConfigError(
            f"--features {features!r} is not a folder (give the --out folder of `foundation embed`)"
        )
    bags, skipped = {}, []
    width, backbone = meta.feature_dim, meta.feature_backbone or ""
    for path in sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".")):
        try:
            bag = look_bag(path)
            if bag.dim != width:
                raise DataError(
                    f"{path}: {bag.dim}-wide features; the model was trained on {width}-wide ones"
                )
            if bag.backbone and backbone and bag.backbone != backbone:
                raise DataError(
                    f"{path}: features of backbone {bag.backbone[:12]!r}; the model was trained on features of "
                    f"{backbone[:12]!r}"
                )
        except DataError as e:
            skipped.append({"slide": path.stem, "reason": str(e)})
            continue
        bags[bag.slide_id] = bag
    if not bags:
        first = f" (first: {skipped[0]['reason']})" if skipped else ""
        raise ConfigError(
            f"--features {features!r} holds no feature file this model can score{first}: embed the slides with "
            "the backbone used for training"
        )
    return bags, skipped


def _slides_by_id(slides: str) -> dict[str, Any]:
    """Slide id (the name ``embed`` gave its feature file) -> the slide under ``--slides``."""
    from foundation_domains.pathology.feature_names import output_names
    from foundation_domains.pathology.source import list_slides

    root = Path(slides)
    found = list_slides(root)
    return {
        name.removesuffix(".h5"): slide for slide, name in zip(found, output_names(found, root), strict=True)
    }


def _key(settings: Settings, feature_file: Path) -> str:
    stat = feature_file.stat()
    return json.dumps(
        {
            "model": settings.model_key,
            "features": [stat.st_size, stat.st_mtime_ns],
            "score": settings.score,
            "class": settings.class_name or "",
        },
        sort_keys=True,
    )


def _png_key(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.text.get("key")
    except (OSError, ValueError):
        return None


def _existing(png: Path, geojson: Path, key: str, overwrite: bool) -> bool:
    """True when both outputs are ours and made with ``key`` (nothing to do). One of ours made with ``key`` whose
    partner is missing (a run stopped between the two) is finished without ``overwrite``.

    Raises:
        OutputError: a file under an output's name is not ours (left alone), or is ours but made otherwise
            and ``overwrite`` is off.
    """
    from foundation.errors import OutputError
    from foundation_domains.pathology.slide_classification.heatmap import is_ours
    from foundation_domains.pathology.slide_classification.tile_geojson import is_our_geojson, stored_key

    for path, ours in ((png, is_ours), (geojson, is_our_geojson)):
        if path.exists() and not ours(path):
            raise OutputError(f"{path} exists and is not a heatmap of ours; it was left as it is (move it)")
    keys = {path: read(path) for path, read in ((png, _png_key), (geojson, stored_key)) if path.exists()}
    if len(keys) == 2 and set(keys.values()) == {key}:
        return True
    if any(k != key for k in keys.values()) and not overwrite:
        raise OutputError(
            f"{png.with_suffix('')}.*: made with another model, features or score; pass --overwrite"
        )
    return False


def _draw(
    slide_id: str,
    feature_file: Path,
    net: Any,
    meta: SlideClassifierMeta,
    s: Settings,
    device: Any,
    slide: Any,
) -> dict | None:
    """Both outputs of one slide; None when they are complete from an earlier run.

    Raises:
        DataError: the feature file cannot be read. OutputError: an output cannot be written or is not ours.
    """
    import numpy as np
    import torch

    from foundation.errors import DataError
    from foundation_domains.pathology.slide_classification.bags import read_bag
    from foundation_domains.pathology.slide_classification.heatmap import (
        ATTENTION_LABEL,
        percentiles,
        slide_thumbnail,
        tile_geometry,
        write_heatmap,
    )
    from foundation_domains.pathology.slide_classification.tile_geojson import (
        recorded_origin,
        tile_collection,
        write_tile_geojson,
    )
    from foundation_domains.pathology.slide_classification.tile_scores import tile_scores

    png, geojson = s.out / f"{slide_id}.png", s.out / f"{slide_id}.geojson"
    key = _key(s, feature_file)
    if _existing(png, geojson, key, s.overwrite):
        return None
    coords, side, _, recorded = tile_geometry(feature_file)
    features = read_bag(feature_file)
    if len(coords) != len(features):
        raise DataError(f"{feature_file}: {len(coords)} tiles in 'coords' but {len(features)} feature rows")
    bad = int((~torch.isfinite(features).all(1)).sum())
    if bad:  # NaN scores would colour nothing and make the GeoJSON invalid JSON
        raise DataError(
            f"{feature_file}: {bad} of its {len(features)} feature rows are not finite (NaN or inf)"
        )
    folds, held_out = meta.held_out_folds(slide_id)  # as evaluate
    runs = [tile_scores(net.head_for_inference(k), features, device) for k in folds]
    attention = np.mean([r["attention"].numpy() for r in runs], 0)
    probs = np.mean([r["probs"].numpy() for r in runs], 0)
    tile_probs = np.mean([r["tile_probs"].numpy() for r in runs], 0)
    c = s.classes.index(s.class_name) if s.class_name else int(np.argmax(probs))
    measurements = {"attention": attention, "attention_percentile": percentiles(attention)}
    measurements.update({f"prob_{name}": tile_probs[:, i] for i, name in enumerate(s.classes)})
    classification = [s.classes[j] for j in tile_probs.argmax(1)] if s.score == "class" else None
    background, source, slide_size, origin = slide_thumbnail(slide or recorded)
    # QuPath's pixels are ours less its origin (a MIRAX slide's bounds): as embed recorded it, else the slide's
    origin = recorded_origin(feature_file) or origin
    squares = np.asarray(coords, np.int64) - np.asarray(origin, np.int64)
    write_tile_geojson(geojson, tile_collection(squares, side, measurements, classification, s.classes, key))
    if background is None:
        log.warning("%s: drawn on white (%s)", slide_id, source)
    if s.score == "class":
        scores, label, as_percentiles = tile_probs[:, c], f"P({s.classes[c]}) per tile", False
    else:
        scores, label, as_percentiles = attention, ATTENTION_LABEL, True
    title = f"{slide_id}: {label}"
    write_heatmap(
        png, feature_file, scores, title, label=label, as_percentiles=as_percentiles, background=background,
        slide_known=True, slide_size=slide_size, text={"key": key},
    )  # fmt: skip
    return {
        "slide": slide_id,
        "png": str(png),
        "geojson": str(geojson),
        "tiles": len(coords),
        "folds": folds,
        "held_out": held_out,
        "class": s.classes[c] if s.score == "class" else None,
        "slide_probs": {name: float(p) for name, p in zip(s.classes, probs, strict=True)},
        "background": "slide" if background is not None else f"white ({source})",
        "qupath_origin": list(origin),
    }


def run_heatmap(args: argparse.Namespace) -> int:
    """See the module docstring. Returns the exit status (0 all done, 2 some skipped).

    Raises:
        CheckpointError, ConfigError, OutputError: refused before anything is written; DataError: no slide done.
    """
    from tqdm import tqdm

    from foundation.batch import exit_status
    from foundation.errors import ConfigError, DataError, OutputError
    from foundation.models.fingerprint import weights_fingerprint
    from foundation.outputs import write_verified
    from foundation.train.distributed import resolve_device
    from foundation_domains.pathology.out_dir import check_out_dir, is_disk_full, make_out_dir
    from foundation_domains.pathology.slide_classification.evaluate import load_slide_classifier
    from foundation_domains.pathology.slide_classification.tile_scores import class_score_source
    from foundation_domains.pathology.slide_list import read_slides_csv

    model = load_slide_classifier(args.checkpoint)
    net, meta = model.net, model.meta
    classes = list(meta.classes)
    if args.class_name is not None and args.score != "class":
        raise ConfigError("--class goes with --score class")
    if args.class_name is not None and args.class_name not in classes:
        raise ConfigError(f"--class {args.class_name!r} is not a class of the model; its classes: {classes}")
    bags, skipped = _scan(args.features, meta)
    out = Path(args.out)
    inputs = [Path(args.features), Path(args.checkpoint), *([Path(args.slides)] if args.slides else [])]
    check_out_dir(out, inputs, summary_key="slides_drawn")
    ids = sorted(bags)
    if args.slides_csv:  # a name of a file skipped above is reported with that file's reason
        chosen, missing = _feature_ids(
            read_slides_csv(args.slides_csv), [*bags, *(s["slide"] for s in skipped)]
        )
        ids = [i for i in chosen if i in bags]
        skipped = [s for s in skipped if s["slide"] in chosen] + missing
    slides = _slides_by_id(args.slides) if args.slides else {}
    make_out_dir(out)
    device = resolve_device(args.device)
    net.to(device).eval()
    settings = Settings(
        out, args.score, args.class_name, classes, weights_fingerprint(net), bool(args.overwrite)
    )
    for item in skipped:
        log.warning("skipping slide %s: %s", item["slide"], item["reason"])
    drawn, complete, disk_full = [], [], None
    for k, slide_id in enumerate(tqdm(ids, desc="heatmap", unit="slide", disable=args.quiet)):
        bag = bags[slide_id]
        try:
            result = _draw(slide_id, bag.path, net, meta, settings, device, slides.get(slide_id))
        except (DataError, OutputError) as e:
            log.warning("skipping slide %s: %s", slide_id, e)
            skipped.append({"slide": slide_id, "reason": str(e)})
            if isinstance(e, OutputError) and is_disk_full(e):
                disk_full = e
                skipped += [{"slide": s, "reason": f"not started: {e}"} for s in ids[k + 1 :]]
                break
            continue
        if result is None:
            complete.append({"slide": slide_id, "png": str(out / f"{slide_id}.png")})
        else:
            drawn.append(result)
    done = len(drawn) + len(complete)
    report = {
        "out": str(out),
        "score": args.score,
        "class_score_from": class_score_source(net.head_for_inference(0)),
        "drawn": len(drawn),
        "complete_before": len(complete),
        "skipped": len(skipped),
        "exit_status": exit_status(done, len(skipped)),
        "slides_drawn": drawn,
        "slides_complete_before": complete,
        "slides_skipped": skipped,
    }
    try:
        text = json.dumps(report, indent=2)
        write_verified(
            out / "summary.json", lambda tmp: tmp.write_text(text), lambda tmp: json.loads(tmp.read_text())
        )
    except OutputError as e:
        log.error("summary not written: %s", e)
    if not done:
        first = f" (first: {skipped[0]['reason']})" if skipped else ""
        raise disk_full or DataError(f"no heatmap drawn: all {len(skipped)} slide(s) skipped{first}")
    log.info("heatmaps in %s", out)
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("slides_")}))
    return int(report["exit_status"])
