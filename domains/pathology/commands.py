"""Command-line parsers of the ``pathology`` domain: ``foundation pathology-qc`` and ``foundation heatmap``.

Registered through the entry-point group ``foundation.commands``; only argparse is imported until the command
runs, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.errors import ConfigError, DataError, OutputError

if TYPE_CHECKING:
    from foundation_domains.pathology.source import PathologyOptions

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``pathology-qc``: a QC picture per slide; ``heatmap``: heatmaps and tile GeoJSON of a slide model."""
    p = subparsers.add_parser(
        "pathology-qc",
        help="tissue mask and tile grid of each slide as a QC picture (PNG)",
        description="For each slide: detect tissue, plan tiles at --mpp/--tile-size, and write "
        "OUT/<slide>.png (thumbnail, tissue outline in green, kept tiles in blue), and OUT/summary.json "
        "(also printed as one JSON line). A broken slide is skipped and listed, and so is one whose PNG name "
        "is taken by a file that is not our QC picture (left as it is). Exit status: 0 every "
        "slide done, 2 some skipped, 1 none done.",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5)")
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels (default 224)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="smallest tissue fraction of a tile")
    add_tiling_arguments(p)
    p.add_argument("--slide-mpp", type=float, help="resolution of every slide, overriding the files")
    p.add_argument("--mpp-csv", help="CSV with columns slide,mpp: per-slide resolution")
    p.add_argument("--max-size", type=int, default=1024, help="longer side of the picture in pixels")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.set_defaults(func=run_qc)

    from foundation_domains.pathology.heatmap_command import add_heatmap_command

    add_heatmap_command(subparsers)


def _threshold(text: str) -> str | float:
    if text == "otsu":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'otsu' nor a number 0-255") from None


def add_tiling_arguments(p: argparse.ArgumentParser) -> None:
    """The tiling controls of ``data.options`` as flags (``pathology-qc``): same names, same meaning."""
    p.add_argument(
        "--tissue-threshold",
        type=_threshold,
        default="otsu",
        help="'otsu' (Otsu's saturation threshold, clipped to --otsu-clip; default) or a fixed saturation 0-255",
    )
    p.add_argument(
        "--otsu-clip", type=int, nargs=2, default=(8, 30), metavar=("LOW", "HIGH"), help="bounds of Otsu"
    )
    p.add_argument("--overlap", type=int, default=0, help="pixels (at --mpp) neighbouring tiles share")
    p.add_argument(
        "--regions",
        help="folder of GeoJSON regions, <slide stem>.geojson (QuPath annotations, level-0 pixels): only tiles "
        "whose centre is inside are kept; a slide without one is skipped",
    )
    p.add_argument(
        "--slides-csv",
        help="CSV of the slides to process (column slide_id, slide or path; CLAM's process_list): names "
        "resolved against the slide folders, those not found reported",
    )


def tiling_options(args: argparse.Namespace) -> PathologyOptions:
    """The flags as ``data.options`` (checked there: one message per bad value, naming the option)."""
    from foundation_domains.pathology.source import PathologyOptions

    return PathologyOptions(
        mpp=args.mpp, tile_size=args.tile_size, min_tissue=args.min_tissue, slide_mpp=args.slide_mpp,
        tissue_threshold=args.tissue_threshold, otsu_clip=tuple(args.otsu_clip), overlap=args.overlap,
        regions=args.regions, slides_csv=args.slides_csv,
    )  # fmt: skip


def _check_ranges(args: argparse.Namespace) -> None:
    checks = {
        "--mpp": args.mpp > 0,
        "--tile-size": args.tile_size >= 8,
        "--min-tissue": 0 <= args.min_tissue <= 1,
        "--slide-mpp": args.slide_mpp is None or args.slide_mpp > 0,
        "--max-size": args.max_size >= 16,
        "--overlap": 0 <= args.overlap < args.tile_size,
        "--tissue-threshold": args.tissue_threshold == "otsu" or 0 <= args.tissue_threshold <= 255,
        "--otsu-clip": 0 <= args.otsu_clip[0] <= args.otsu_clip[1] <= 255,
    }
    for flag, ok in checks.items():
        if not ok:
            raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))!r} is out of range")


def _picture_name(path: Path, root: Path) -> str:
    """Sub-folders in the name, so equal file names in two cases do not overwrite each other."""
    return ("__".join(path.relative_to(root).parts) if root.is_dir() else "") or path.name


def _qc_one(
    path: Path,
    root: Path,
    out: Path,
    args: argparse.Namespace,
    table: dict[str, float],
    o: PathologyOptions,
    name: str | None = None,
) -> dict:
    """The QC picture of one slide; returns its line of the report.

    Raises:
        DataError: the slide (or its region file) cannot be read. OutputError: the picture cannot be written.
    """
    from foundation_domains.pathology.regions import region_for
    from foundation_domains.pathology.slide import open_slide
    from foundation_domains.pathology.source import mpp_override
    from foundation_domains.pathology.tissue import tile_slide, write_qc

    region = region_for(path, o.regions, name)
    with open_slide(path, mpp_override(path, args.slide_mpp, table, root)) as slide:
        mask, tiling = tile_slide(slide, o.mpp, o.tile_size, o.rules, region)
        png = write_qc(out / f"{_picture_name(path, root)}.png", slide, mask, tiling, args.max_size, region)
        return {
            "slide": str(path),
            "png": str(png),
            "tiles": len(tiling),
            "level": tiling.level,
            "mpp": slide.mpp,
        }


def run_qc(args: argparse.Namespace) -> int:
    """``foundation pathology-qc``: one PNG per slide and ``OUT/summary.json``; broken slides are reported and
    skipped, a full disk stops the rest. Exit status (:func:`foundation.batch.exit_status`): 0 every slide
    done, 2 some skipped; nothing done raises (exit 1)."""
    from tqdm import tqdm

    from foundation.batch import exit_status
    from foundation.outputs import write_verified
    from foundation_domains.pathology.out_dir import check_out_dir, is_disk_full, make_out_dir
    from foundation_domains.pathology.source import list_slides, read_mpp_csv

    _check_ranges(args)
    options = tiling_options(args)
    roots = [Path(root) for root in args.slides]
    slides = [(path, root) for root in roots for path in list_slides(root)]
    names = _names(slides) if options.regions else {}  # a region is named as embed names the slide's features
    not_listed = []
    if args.slides_csv:
        slides, not_listed = _listed(slides, args.slides_csv)
    table = read_mpp_csv(args.mpp_csv) if args.mpp_csv else {}
    out = Path(args.out)
    check_out_dir(out, roots, summary_key="failed")
    make_out_dir(out)
    done, disk_full = [], None
    failed = [{"slide": m["slide"], "error": m["reason"]} for m in not_listed]
    for m in not_listed:
        log.warning("skipping slide: %s", m["reason"])
    for k, (path, root) in enumerate(tqdm(slides, desc="pathology-qc", unit="slide", disable=args.quiet)):
        try:
            done.append(_qc_one(path, root, out, args, table, options, names.get(path)))
        except (DataError, OutputError) as e:
            log.warning("skipping slide: %s", e)
            failed.append({"slide": str(path), "error": str(e)})
            if isinstance(e, OutputError) and is_disk_full(e):
                disk_full = e
                failed += [{"slide": str(p), "error": f"not started: {e}"} for p, _ in slides[k + 1 :]]
                break
    report = {
        "out": str(out),
        "slides": done,
        "failed": failed,
        "exit_status": exit_status(len(done), len(failed)),
    }
    try:
        write_verified(
            out / "summary.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)), _read_json
        )
    except OutputError as e:
        log.error("summary not written: %s", e)
    if not done:
        raise disk_full or DataError(
            f"no QC picture written: all {len(slides)} slide(s) failed (see the log)"
        )
    log.info("QC pictures in %s", out)
    print(json.dumps(report))
    return report["exit_status"]


def _names(slides: list[tuple[Path, Path]]) -> dict[Path, str]:
    """Each slide's name as ``embed`` gives it among the slides of its folder (``x__s`` when ``s`` repeats)."""
    from foundation_domains.pathology.feature_names import output_names

    names: dict[Path, str] = {}
    for root in dict.fromkeys(r for _, r in slides):
        paths = [p for p, r in slides if r == root]
        names.update(zip(paths, (n.removesuffix(".h5") for n in output_names(paths, root)), strict=True))
    return names


def _listed(slides: list[tuple[Path, Path]], csv_path: str) -> tuple[list[tuple[Path, Path]], list[dict]]:
    """The slides ``--slides-csv`` names (each name looked for under every slide folder given), and the names
    that match none.

    Raises:
        DataError: the CSV is broken or names none of the slides.
    """
    from foundation_domains.pathology.slide_list import choose_slides, read_slides_csv

    names = read_slides_csv(csv_path)
    roots = list(dict.fromkeys(root for _, root in slides))
    chosen: set[Path] = set()
    reasons: dict[str, str] = {}  # names no folder has: the first folder's reason
    found: set[str] = set()
    for root in roots:
        choice = choose_slides(names, [p for p, r in slides if r == root], root)
        chosen |= set(choice.chosen)
        for m in choice.missing:
            reasons.setdefault(m["slide"], m["reason"])
        found |= set(names) - {m["slide"] for m in choice.missing}
    missing = [{"slide": n, "reason": f"{csv_path}: {reasons[n]}"} for n in names if n not in found]
    if not chosen:
        raise DataError(f"{csv_path}: names none of the {len(slides)} slide(s) found")
    return [(p, r) for p, r in slides if p in chosen], missing


def _read_json(path: Path) -> None:
    json.loads(path.read_text())
