"""``foundation canopy-height SCENE.tif [...] --checkpoint CKPT --out OUT``: GeoTIFF in, COG out.

Each scene is read in windows with the checkpoint's own band selection, scale and mean/std (the same
:class:`~domains.remote_sensing.canopy.data.Normalization` as training), predicted in overlapping tiles
blended without seams (:mod:`.tiling`), written row strip by row strip to a temporary GeoTIFF and turned into
a validated COG (:mod:`.cog`) under the final name only at the end. Memory is bounded by the tile rows in
flight, not by the scene. Under ``torchrun`` (or ``--nproc N``) scenes are shared out by rank.

A batch skips a scene it cannot map (unreadable, wrong band count, all nodata, a read error mid-scene, an
existing output without ``--overwrite``), names it and the reason in its JSON summary, and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from domains.remote_sensing.commands import OUT_SUFFIX
from foundation.errors import ConfigError, DataError, FoundationError

if TYPE_CHECKING:  # rasterio is imported only when a scene is mapped
    from domains.remote_sensing.canopy.data import Normalization

log = logging.getLogger(__name__)

GSD_TOLERANCE = 1.5  # warn when scene and training resolution differ by more than this factor
GDAL_CACHE_MB = 64  # GDAL's block cache (default: 5% of RAM) bounded, so memory does not grow with the scene
M_PER_DEG = 111_320.0  # metres per degree of latitude / of longitude at the equator


@dataclass(frozen=True)
class MapOptions:
    """How one scene is mapped (the CLI flags that are not about which files)."""

    tile: int
    overlap: int
    batch_size: int = 16
    device: str | torch.device = "cpu"
    precision: str = "auto"
    overwrite: bool = False
    quicklook: bool = False
    resample: bool = False
    nodata: float | None = None
    chunk_width: int = 2048
    quiet: bool = False


# -- the command line (parser: domains/remote_sensing/commands.py) -----------------------------------------
def cmd_canopy_height(args: argparse.Namespace) -> int:
    """Map every scene (this rank's share), print one JSON line per scene, return the exit status."""
    from foundation.train.distributed import all_gather_objects, destroy_distributed, init_distributed

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from foundation.cli import spawn_local

        return spawn_local(args.nproc, sys.argv[1:])
    scenes = list_scenes(args.scenes)
    outputs = output_paths(scenes, Path(args.out))
    from domains.remote_sensing.canopy.model import load_canopy_model

    dist_info = init_distributed(args.device)
    try:
        net, meta = load_canopy_model(args.checkpoint)
        net = net.to(dist_info.device)
        tile = int(args.tile or meta.get("tile_size") or 256)
        opts = MapOptions(
            tile=tile,
            overlap=tile // 4 if args.overlap is None else int(args.overlap),
            batch_size=args.batch_size,
            device=dist_info.device,
            precision=args.precision,
            overwrite=args.overwrite,
            quicklook=args.quicklook,
            resample=args.resample,
            nodata=args.nodata if args.nodata is not None else meta.get("nodata"),
            quiet=args.quiet or not dist_info.is_main,
        )
        check_tile(net, opts)
        jobs = list(enumerate(zip(scenes, outputs, strict=True)))[dist_info.rank :: dist_info.world_size]
        results = [(i, map_scene_safely(net, meta, src, dst, opts)) for i, (src, dst) in jobs]
        gathered = sorted(r for part in all_gather_objects(results) for r in part)  # input order
        results = [r for _, r in gathered]
    finally:
        destroy_distributed()
    return report(results, dist_info.is_main, args.checkpoint)


def report(results: list[dict[str, Any]], is_main: bool, checkpoint: str) -> int:
    """Print the per-scene JSON lines (main rank) and turn them into the exit status."""
    skipped = [r for r in results if r["status"] != "done"]
    if is_main:
        for r in results:
            print(json.dumps(r))
        done = len(results) - len(skipped)
        log.info("%d map(s) written, %d scene(s) skipped (model %s)", done, len(skipped), checkpoint)
    if skipped and len(skipped) == len(results):
        reasons = "; ".join(r["reason"] for r in skipped[:5])
        raise DataError(f"no scene could be mapped: {reasons}")
    return 1 if skipped else 0


def list_scenes(items: Sequence[str]) -> list[Path]:
    """Files as given, folders searched recursively for rasters; a missing path is an error up front."""
    from domains.remote_sensing.raster import list_rasters

    scenes: list[Path] = []
    for item in items:
        scenes.extend(list_rasters(item))
    return scenes


def output_paths(scenes: list[Path], out: Path) -> list[Path]:
    """``--out x.tif`` for one scene, else ``OUT/<stem>_chm.tif`` (stems must then be unique).

    Raises:
        ConfigError: a .tif for several scenes, or two scenes that would write the same file.
    """
    if out.suffix.lower() in (".tif", ".tiff"):
        if len(scenes) != 1:
            raise ConfigError(
                f"--out {str(out)!r} is a file but {len(scenes)} scenes were given; give a folder"
            )
        if not out.parent.is_dir():
            raise ConfigError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
        return [out]
    paths = [out / f"{s.stem}{OUT_SUFFIX}" for s in scenes]
    seen: dict[Path, Path] = {}
    for s, p in zip(scenes, paths, strict=True):
        if p in seen:
            raise ConfigError(f"{seen[p]} and {s} would both write {p}; rename one or map them separately")
        seen[p] = s
    out.mkdir(parents=True, exist_ok=True)
    return paths


def check_tile(net: torch.nn.Module, opts: MapOptions) -> None:
    """The tile must be a multiple of the backbone's patch size."""
    patch = int(getattr(getattr(net, "backbone", None), "patch_size", 1) or 1)
    if opts.tile % patch:
        raise ConfigError(f"--tile {opts.tile} must be a multiple of the backbone's patch size {patch}")


# -- one scene -----------------------------------------------------------------------------------------------
def map_scene_safely(
    net: torch.nn.Module, meta: dict[str, Any], src: Path, dst: Path, opts: MapOptions
) -> dict:
    """:func:`map_scene`, with a bad scene turned into a ``skipped`` summary (batch jobs go on)."""
    try:
        return map_scene(net, meta, src, dst, opts)
    except FoundationError as e:
        log.error("skipping %s: %s", src, e)
        return {"scene": str(src), "status": "skipped", "out": str(dst), "reason": str(e)}


def map_scene(net: torch.nn.Module, meta: dict[str, Any], src: Path, dst: Path, opts: MapOptions) -> dict:
    """Map ``src`` to the COG ``dst`` (and ``dst.png`` with ``quicklook``); returns a summary.

    Raises:
        DataError: the scene cannot be read or mapped (the message names the file); ``dst`` is untouched.
        ConfigError: bad options.
    """
    import rasterio

    from domains.remote_sensing.canopy import cog
    from domains.remote_sensing.canopy.tiling import TileGrid, blend_tiles

    if dst.exists() and not opts.overwrite:
        raise DataError(f"{dst} exists; pass --overwrite to replace it")
    png = dst.with_suffix(".png")
    if opts.quicklook and png.exists() and not opts.overwrite:
        raise DataError(f"{png} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    part = cog.temp_name(dst, "part")
    env = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    try:
        with rasterio.Env(**env), open_scene(src, meta, opts) as scene:
            grid = TileGrid(scene.ds.height, scene.ds.width, opts.tile, opts.overlap)
            tags = {"model": "canopy-height", "source": src.name, "units": "m"}
            with (
                cog.strip_writer(
                    part,
                    height=grid.height,
                    width=grid.width,
                    crs=scene.ds.crs,
                    transform=scene.ds.transform,
                    tags=tags,
                ) as writer,
                _progress(len(grid), src.name, opts.quiet) as bar,
            ):
                valid_px = blend_tiles(
                    net,
                    scene.read,
                    grid,
                    lambda r0, rows: writer.write(rows[None], window=_rows(r0, rows, grid.width)),
                    batch_size=opts.batch_size,
                    device=opts.device,
                    precision=opts.precision,
                    chunk_width=opts.chunk_width,
                    progress=bar.update,
                )
            if valid_px == 0:
                raise DataError(f"{src}: every pixel is nodata; nothing to map")
            cog.write_cog(part, dst, overwrite=opts.overwrite)
            if opts.quicklook:
                cog.write_quicklook(dst, png, max_height=float(meta.get("max_height") or 96.0))
    finally:
        part.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    summary = {
        "scene": str(src),
        "status": "done",
        "out": str(dst),
        "height": grid.height,
        "width": grid.width,
        "tiles": len(grid),
        "valid_fraction": round(valid_px / (grid.height * grid.width), 4),
        "seconds": round(seconds, 2),
        "mpx_s": round(grid.height * grid.width / 1e6 / max(seconds, 1e-9), 3),
    }
    if scene.resampled:
        summary["resampled_gsd_m"] = scene.gsd
    if opts.quicklook:
        summary["quicklook"] = str(png)
    log.info("%s -> %s (%.1f s)", src, dst, seconds)
    return summary


def _rows(r0: int, rows: np.ndarray, width: int):
    from rasterio.windows import Window

    return Window(0, r0, width, rows.shape[0])


@contextlib.contextmanager
def _progress(total: int, name: str, quiet: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, desc=name, unit="tile", disable=quiet, dynamic_ncols=True) as bar:
        yield bar


# -- reading a scene with the checkpoint's normalisation -----------------------------------------------------
@dataclass
class Scene:
    """An open scene (or its resampled view) and a reader of normalised windows."""

    path: Path
    ds: Any  # rasterio dataset or WarpedVRT
    bands: tuple[int, ...]
    norm: Normalization  # the checkpoint's, applied exactly as in training
    scale: float
    gsd: float | None
    resampled: bool

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        try:
            return self.norm.read(self.ds, self.bands, self.scale, Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as e:
            raise DataError(f"{self.path}: read error in rows {r0}-{r1}, columns {c0}-{c1}: {e}") from e


@contextlib.contextmanager
def open_scene(path: Path, meta: dict[str, Any], opts: MapOptions) -> Iterator[Scene]:
    """Open ``path``, check it against the checkpoint, and give a :class:`Scene` (resampled if asked).

    Raises:
        DataError: unreadable, wrong band count (naming both counts), or ``--resample`` without a CRS.
    """
    from domains.remote_sensing.raster import inspect_raster, open_raster, value_scale

    bands = tuple(int(b) for b in meta["bands"]) if meta.get("bands") else None
    with open_raster(path) as ds:  # a file GDAL cannot open is named by open_raster
        count = ds.count
    if bands and max(bands) > count:
        raise DataError(
            f"{path}: has {count} band(s), but the checkpoint reads bands {list(bands)} "
            f"({len(bands)} band(s)); map scenes of the sensor it was trained on"
        )
    info = inspect_raster(path, bands)
    expected = int(meta["in_chans"])
    if info.channels != expected:
        raise DataError(
            f"{path}: gives {info.channels} band(s) (bands {','.join(map(str, info.bands))}) but the "
            f"checkpoint's model takes {expected} (select bands when fine-tuning, or map scenes of the "
            "sensor it was trained on)"
        )
    if info.crs is None:
        log.info("%s: no CRS, so the map has none either", path)
    mean, std = meta["mean"], meta["std"]
    if len(mean) != expected or len(std) != expected:
        raise DataError(f"checkpoint meta: {len(mean)} means / {len(std)} stds for {expected} bands")
    from domains.remote_sensing.canopy.data import Normalization

    norm = Normalization(tuple(mean), tuple(max(float(v), 1e-6) for v in std), opts.nodata)
    scale = value_scale(info, meta.get("scale", "auto"))
    with open_raster(path) as ds:
        gsd, train_gsd = scene_gsd(ds), meta.get("gsd")
        if opts.resample and train_gsd:
            if gsd is None:
                raise DataError(f"{path}: --resample needs a georeferenced scene (no CRS or unknown units)")
            with resampled_view(ds, float(train_gsd) / gsd) as vrt:
                log.info("%s: resampled from %.3g to %.3g m/px", path, gsd, float(train_gsd))
                yield Scene(path, vrt, info.bands, norm, scale, float(train_gsd), True)
            return
        if opts.resample:  # and no training resolution to resample to
            log.warning("%s: the checkpoint records no training resolution; --resample ignored", path)
        check_gsd(path, gsd, train_gsd)
        yield Scene(path, ds, info.bands, norm, scale, gsd, False)


def scene_gsd(ds: Any) -> float | None:
    """Approximate metres per pixel (mean of x and y): projected units converted, degrees at the centre."""
    crs = ds.crs
    if crs is None:
        return None
    rx, ry = abs(ds.transform.a), abs(ds.transform.e)
    if crs.is_geographic:
        lat = math.radians(ds.xy(ds.height / 2, ds.width / 2)[1])
        return float((rx * M_PER_DEG * math.cos(lat) + ry * M_PER_DEG) / 2)
    try:
        factor = float(crs.linear_units_factor[1])
    except Exception:  # a CRS without linear units (rasterio raises CRSError): no resolution check
        return None
    return float((rx + ry) / 2 * factor)


def check_gsd(path: Path, gsd: float | None, train_gsd: float | None) -> None:
    """Warn when the scene's resolution is far from the training resolution (models do not transfer)."""
    if gsd is None or not train_gsd:
        return
    ratio = gsd / float(train_gsd)
    if ratio > GSD_TOLERANCE or ratio < 1 / GSD_TOLERANCE:
        log.warning(
            "%s: %.3g m/px, but the model was trained at %.3g m/px; heights may be unreliable "
            "(--resample reads the scene at the training resolution)",
            path, gsd, float(train_gsd),
        )  # fmt: skip


@contextlib.contextmanager
def resampled_view(ds: Any, factor: float) -> Iterator[Any]:
    """A WarpedVRT of ``ds`` with the same CRS and extent and ``factor`` times its pixel size.

    Averaging when pixels get larger, bilinear when they get smaller; masks and nodata carried along.
    """
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    width = max(1, round(ds.width / factor))
    height = max(1, round(ds.height / factor))
    transform = ds.transform @ Affine.scale(ds.width / width, ds.height / height)
    resampling = Resampling.average if factor > 1 else Resampling.bilinear
    with WarpedVRT(
        ds, crs=ds.crs, transform=transform, width=width, height=height, resampling=resampling
    ) as vrt:
        yield vrt
