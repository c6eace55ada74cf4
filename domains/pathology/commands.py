"""Command-line parser of the ``pathology`` domain: ``foundation pathology-qc``.

Registered through the entry-point group ``foundation.commands``; only argparse is imported until the command
runs, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from foundation.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``pathology-qc``: a QC picture per slide."""
    p = subparsers.add_parser(
        "pathology-qc",
        help="tissue mask and tile grid of each slide as a QC picture (PNG)",
        description="For each slide: detect tissue, plan tiles at --mpp/--tile-size, and write "
        "OUT/<slide>.png (thumbnail, tissue outline in green, kept tiles in blue). Prints one JSON line.",
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


def run_qc(args: argparse.Namespace) -> int:
    """``foundation pathology-qc``: one PNG per slide; broken slides are reported and skipped."""
    from tqdm import tqdm

    from domains.pathology.slide import open_slide
    from domains.pathology.source import list_slides, mpp_override, read_mpp_csv
    from domains.pathology.tissue import mask_for_tiles, plan_tiles, write_qc

    checks = {
        "--mpp": args.mpp > 0,
        "--tile-size": args.tile_size >= 8,
        "--min-tissue": 0 <= args.min_tissue <= 1,
        "--slide-mpp": args.slide_mpp is None or args.slide_mpp > 0,
    }
    for flag, ok in checks.items():
        if not ok:
            raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))!r} is out of range")
    table = read_mpp_csv(args.mpp_csv) if args.mpp_csv else {}
    slides = [(path, Path(root)) for root in args.slides for path in list_slides(root)]
    out = Path(args.out)
    done, failed = [], []
    for path, root in tqdm(slides, desc="pathology-qc", unit="slide", disable=args.quiet):
        try:
            with open_slide(path, mpp_override(path, args.slide_mpp, table, root)) as slide:
                mask = mask_for_tiles(slide, args.mpp, args.tile_size)
                tiling = plan_tiles(slide, mask, args.mpp, args.tile_size, args.min_tissue)
                # sub-folders in the name, so equal file names in two cases do not overwrite each other
                name = ("__".join(path.relative_to(root).parts) if root.is_dir() else "") or path.name
                png = write_qc(out / f"{name}.png", slide, mask, tiling, args.max_size)
                mpp = slide.mpp
        except DataError as e:
            log.warning("skipping slide: %s", e)
            failed.append({"slide": str(path), "error": str(e)})
            continue
        done.append(
            {"slide": str(path), "png": str(png), "tiles": len(tiling), "level": tiling.level, "mpp": mpp}
        )
    if not done:
        raise DataError(f"no QC picture written: all {len(slides)} slide(s) failed (see the log)")
    log.info("QC pictures in %s", out)
    print(json.dumps({"out": str(out), "slides": done, "failed": failed}))
    return 0
