"""Command-line parser of the ``pathology`` domain: ``foundation pathology-qc``.

Registered through the entry-point group ``foundation.commands``; only argparse is imported until the command
runs, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from foundation.errors import ConfigError, DataError, OutputError

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``pathology-qc``: a QC picture per slide."""
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
    p.add_argument("--slide-mpp", type=float, help="resolution of every slide, overriding the files")
    p.add_argument("--mpp-csv", help="CSV with columns slide,mpp: per-slide resolution")
    p.add_argument("--max-size", type=int, default=1024, help="longer side of the picture in pixels")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.set_defaults(func=run_qc)


def _check_ranges(args: argparse.Namespace) -> None:
    checks = {
        "--mpp": args.mpp > 0,
        "--tile-size": args.tile_size >= 8,
        "--min-tissue": 0 <= args.min_tissue <= 1,
        "--slide-mpp": args.slide_mpp is None or args.slide_mpp > 0,
        "--max-size": args.max_size >= 16,
    }
    for flag, ok in checks.items():
        if not ok:
            raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))!r} is out of range")


def _picture_name(path: Path, root: Path) -> str:
    """Sub-folders in the name, so equal file names in two cases do not overwrite each other."""
    return ("__".join(path.relative_to(root).parts) if root.is_dir() else "") or path.name


def _qc_one(path: Path, root: Path, out: Path, args: argparse.Namespace, table: dict[str, float]) -> dict:
    """The QC picture of one slide; returns its line of the report.

    Raises:
        DataError: the slide cannot be read. OutputError: the picture cannot be written.
    """
    from domains.pathology.slide import open_slide
    from domains.pathology.source import mpp_override
    from domains.pathology.tissue import mask_for_tiles, plan_tiles, write_qc

    with open_slide(path, mpp_override(path, args.slide_mpp, table, root)) as slide:
        mask = mask_for_tiles(slide, args.mpp, args.tile_size)
        tiling = plan_tiles(slide, mask, args.mpp, args.tile_size, args.min_tissue)
        png = write_qc(out / f"{_picture_name(path, root)}.png", slide, mask, tiling, args.max_size)
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

    from domains.pathology.out_dir import check_out_dir, is_disk_full, make_out_dir
    from domains.pathology.source import list_slides, read_mpp_csv
    from foundation.batch import exit_status
    from foundation.outputs import write_verified

    _check_ranges(args)
    roots = [Path(root) for root in args.slides]
    slides = [(path, root) for root in roots for path in list_slides(root)]
    table = read_mpp_csv(args.mpp_csv) if args.mpp_csv else {}
    out = Path(args.out)
    check_out_dir(out, roots, summary_key="failed")
    make_out_dir(out)
    done, failed, disk_full = [], [], None
    for k, (path, root) in enumerate(tqdm(slides, desc="pathology-qc", unit="slide", disable=args.quiet)):
        try:
            done.append(_qc_one(path, root, out, args, table))
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


def _read_json(path: Path) -> None:
    json.loads(path.read_text())
