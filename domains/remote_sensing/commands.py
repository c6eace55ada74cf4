"""Command-line parsers of the ``remote_sensing`` domain: ``foundation canopy-height`` and ``foundation stats``.

Registered through the entry-point group ``foundation.commands``. Only argparse is imported here, so
``foundation --help`` lists every command without importing torch or rasterio; each command's code is
imported when it runs.
"""

from __future__ import annotations

import argparse
import logging

from foundation_domains.remote_sensing.canopy.naming import OUT_SUFFIX

log = logging.getLogger(__name__)

COMMAND = "canopy-height"
EPILOG = """\
examples:
  foundation canopy-height scene.tif --checkpoint runs/chm/model.pt --out chm.tif
  foundation canopy-height tiles/*.tif --checkpoint runs/chm --out maps/ --quicklook --batch-size 32
  foundation canopy-height tiles/ --checkpoint runs/chm --out maps/ --nproc 4      # 4 local workers
  torchrun --nnodes 2 --node-rank $RANK --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      --nproc-per-node 8 -m foundation canopy-height tiles/ --checkpoint runs/chm --out maps/

Exit status: 0 every scene mapped (now, or already by this model), 2 some scene skipped (see the JSON lines),
1 nothing could be done. --out is never an input, a folder holding one, or a link to one; --overwrite replaces
only maps (and quicklooks) this command wrote. NaN/infinite pixels are treated as nodata (NaN in the map).
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``canopy-height`` and ``stats`` (a name another package registered first is left to it)."""
    add_canopy_parser(subparsers)
    if "stats" in subparsers.choices:
        log.debug("remote_sensing: a 'stats' command exists already; not adding ours")
        return
    p = subparsers.add_parser(
        "stats",
        help="per-band statistics of rasters (mean, std, 2nd/98th percentiles) to JSON",
        description="Per-band statistics of a raster or a folder of rasters, nodata and NaN/infinite "
        "values excluded, in the units the remote_sensing domain trains in (pixel values / scale). Use the "
        "file with `foundation pretrain --domain remote_sensing data.options.stats=FILE`. A file that cannot "
        "be read, or has no valid pixel, is skipped and named. Exit status: 0 every file used, 2 some "
        "skipped, 1 none usable.",
    )
    p.add_argument(
        "data",
        help="a raster or its URL (https://, s3://), a folder searched recursively (.tif .tiff .vrt .jp2 .img), "
        "or a .txt/.csv list of paths and URLs",
    )
    p.add_argument(
        "--out",
        required=True,
        help="JSON file to write (atomically); an existing file is replaced only if it is a statistics "
        "file written by `foundation stats`, never another file or an input",
    )
    p.add_argument("--bands", help="1-based bands in order, e.g. 3,2,1 (default: all but alpha)")
    p.add_argument("--scale", default="auto", help="divisor: auto (uint8 255, (u)int16 10000, else 1)")
    p.add_argument("--nodata", type=float, help="nodata value for files that declare none")
    p.add_argument("--window", type=int, default=512, help="side of the windows read (default 512)")
    p.add_argument(
        "--max-windows", type=int, help="read at most this many random windows (default: everything)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the window sample and percentiles")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.set_defaults(func=cmd_stats)


def add_canopy_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``canopy-height`` (unless a command of that name exists already)."""
    if COMMAND in subparsers.choices:
        log.debug("remote_sensing: a %r command exists already; not adding ours", COMMAND)
        return
    p = subparsers.add_parser(
        COMMAND,
        help="canopy-height map of GeoTIFF scenes -> Cloud-Optimized GeoTIFF (float32 metres, NaN nodata)",
        description="Predict canopy height (metres) over whole scenes with a model from `foundation finetune "
        "canopy-height`. Output: float32, NaN nodata, the input's CRS, transform and size, tiled + DEFLATE "
        "(predictor 3) + overviews, validated as a Cloud-Optimized GeoTIFF.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenes",
        nargs="+",
        help="rasters (any GDAL format), their URLs (https://, s3://), folders of them, or .txt/.csv lists",
    )
    p.add_argument("--checkpoint", required=True, help="RUN/model.pt, a run folder or a training checkpoint")
    p.add_argument(
        "--out",
        required=True,
        help=f"a .tif for one scene, else a folder (gets <stem>{OUT_SUFFIX} per scene)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace maps this command wrote earlier (default: keep them; one by this model counts as done)",
    )
    p.add_argument("--quicklook", action="store_true", help="also write a colour PNG next to each map")
    p.add_argument(
        "--labels",
        help="with --quicklook: reference canopy heights (a raster, or a folder matched by file name); next to "
        "each map <map>_density.png (predicted vs reference) and <map>_height_bins.png (error per height bin)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass (default 16)")
    p.add_argument("--tile", type=int, help="tile side in px; default: the checkpoint's training tile size")
    p.add_argument("--overlap", type=int, help="px shared by neighbouring tiles; default: a quarter tile")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="inference precision; auto: bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--resample",
        action="store_true",
        help="read each scene resampled to the checkpoint's training resolution (same CRS and extent; "
        "the map then has that resolution); default: predict at the scene's own resolution, with a "
        "warning when it is more than 1.5x off",
    )
    p.add_argument(
        "--nodata",
        type=float,
        help="nodata value (raw units) for scenes that declare none; default: the checkpoint's, if any",
    )
    p.add_argument(
        "--nproc", type=int, default=0, help="spawn this many local workers (torchrun --standalone)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when available"
    )
    p.set_defaults(func=cmd_canopy_height)


def cmd_canopy_height(args: argparse.Namespace) -> int:
    from foundation_domains.remote_sensing.canopy.mapping import cmd_canopy_height as run

    return run(args)


def cmd_stats(args: argparse.Namespace) -> int:
    from foundation_domains.remote_sensing.domain import cmd_stats as run

    return run(args)
