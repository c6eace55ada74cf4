"""``foundation canopy-height SCENE.tif [...] --checkpoint CKPT --out OUT``: GeoTIFF in, COG out.

Each scene is read in windows with the checkpoint's own band selection, scale and mean/std (the same
:class:`~foundation_domains.remote_sensing.canopy.data.Normalization` as training), predicted in overlapping tiles
blended without seams (:mod:`.tiling`), written row strip by row strip to a temporary GeoTIFF and turned into
a validated COG (:mod:`.cog`) under the final name only at the end. Memory is bounded by the tile rows in
flight, not by the scene. The batch runs on :mod:`foundation.batch.runner`: under ``torchrun`` (or ``--nproc
N``) scene ``i`` goes to rank ``i % world_size``; with a folder ``--out`` the common ``OUT/summary.json``
(``written`` / ``existing`` / ``skipped`` scenes, each entry also holding its JSON line's keys) is written.

NaN and infinite pixel values are missing data, like nodata: fed to the network as the mean, NaN in the map;
their fraction is logged and reported per scene (``nonfinite_fraction``).

A batch skips a scene it cannot map (unreadable, wrong band count, every pixel nodata or non-finite, a read
error mid-scene, a full disk, an existing file that is not a map of ours, or a map of ours by another model
without ``--overwrite``), names it and the reason in its JSON line, and goes on. A map this model already made
of the same input (its resolved path, size and modification time, kept in the map's tags) counts as done
(``"status": "exists"``); one of another input under that name is not done and needs ``--overwrite``. Exit status (:func:`foundation.batch.exit_status`):
0 every scene done, 2 some skipped, 1 none done. ``--out`` is checked before any work: never an input (nor a
folder holding one, nor a link to one), never a file where a folder is needed; it is created only once the
checkpoint has loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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

from foundation.batch import exit_status
from foundation.batch.launch import should_spawn, spawn_batch
from foundation.batch.report import SKIPPED, BatchReport
from foundation.batch.runner import BatchSpec, Item, Steps, finish, run_items
from foundation.batch.summary import check_summaries
from foundation.errors import ConfigError, DataError, FoundationError, OutputError
from foundation.outputs import check_not_input, check_writable, output_error, temporary_name
from foundation_domains.remote_sensing.canopy.naming import OUT_SUFFIX

if TYPE_CHECKING:  # rasterio is imported only when a scene is mapped
    from foundation_domains.remote_sensing.canopy.data import Normalization
    from foundation_domains.remote_sensing.canopy.meta import CanopyMeta

log = logging.getLogger(__name__)

GSD_TOLERANCE = 1.5  # warn when scene and training resolution differ by more than this factor
GDAL_CACHE_MB = 64  # GDAL's block cache (default: 5% of RAM) bounded, so memory does not grow with the scene
M_PER_DEG = 111_320.0  # metres per degree of latitude / of longitude at the equator
COMMAND = "canopy-height"


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
    labels: str | None = None  # reference heights (a file or folder): comparison plots with the quicklook
    resample: bool = False
    nodata: float | None = None
    chunk_width: int = 2048
    quiet: bool = False


# -- the command line (parser: domains/remote_sensing/commands.py) -----------------------------------------
def cmd_canopy_height(args: argparse.Namespace) -> int:
    """Map every scene (this rank's share) on :mod:`foundation.batch.runner`, print one JSON line per scene
    (main rank), write ``OUT/summary.json`` when ``--out`` is a folder; return the exit status."""
    from foundation.train.distributed import destroy_distributed, init_distributed

    if should_spawn(args.nproc):
        return spawn_batch(args.nproc, sys.argv[1:])
    out = Path(args.out)
    labels = getattr(args, "labels", None)
    if labels and not args.quicklook:
        raise ConfigError("--labels draws its comparison plots next to the quicklook: add --quicklook")
    if labels and not Path(labels).exists():
        raise DataError(f"--labels {labels!r} does not exist")
    scenes = list_scenes(args.scenes, out)
    protected = [Path(args.checkpoint), *([Path(labels)] if labels else [])]
    outputs = output_paths(scenes, out, protected=protected)
    summary_dir = None if outputs == [out] else out  # one map written to the file named: no summary
    if summary_dir is not None:
        check_summaries(summary_dir, COMMAND)
    from foundation_domains.remote_sensing.canopy.model import load_canopy

    dist_info = init_distributed(args.device)
    try:
        model = load_canopy(args.checkpoint)
        make_output_folder(outputs[0].parent)  # only now: a bad checkpoint leaves nothing behind
        net, meta = model.net.to(dist_info.device), model.meta
        fingerprint = model_fingerprint(net, meta)
        tile = int(args.tile or meta.tile_size)
        opts = MapOptions(
            tile=tile,
            overlap=tile // 4 if args.overlap is None else int(args.overlap),
            batch_size=args.batch_size,
            device=dist_info.device,
            precision=args.precision,
            overwrite=args.overwrite,
            quicklook=args.quicklook,
            labels=labels,
            resample=args.resample,
            nodata=args.nodata if args.nodata is not None else meta.nodata,
            quiet=args.quiet or not dist_info.is_main,
        )
        check_tile(net, opts)
        spec = BatchSpec(
            COMMAND, "scene", skip_errors=(FoundationError,), progress=not args.quiet,
            entry_keys=lambda item: {"scene": item.name, "out": str(item.out)},
        )  # fmt: skip
        steps: Steps[Path, Item[Path]] = Steps(
            run=lambda item, _: map_scene(net, meta, item.source, item.out, opts, fingerprint=fingerprint),
            existing=lambda item: _done_before(net, meta, item, opts, fingerprint),
        )
        items = [
            Item(i, str(src), src, dst) for i, (src, dst) in enumerate(zip(scenes, outputs, strict=True))
        ]
        report_ = run_items(items, steps, spec, rank=dist_info.rank, world_size=dist_info.world_size)
        outcome = finish(
            report_, spec, rank=dist_info.rank, world_size=dist_info.world_size, summary_dir=summary_dir,
            out=str(out), facts=lambda r: {"checkpoint": str(args.checkpoint)},
        )  # fmt: skip
    finally:
        destroy_distributed()
    report(scene_lines(outcome.report), outcome.is_main, args.checkpoint)
    outcome.raise_error()
    return outcome.exit_code()


def _done_before(
    net: torch.nn.Module, meta: CanopyMeta, item: Item[Path], opts: MapOptions, fingerprint: str
) -> dict | None:
    """The runner's ``existing`` step: the JSON line of a scene this model already mapped (``"status":
    "exists"``; a missing quicklook asked for is drawn), None when it is to be mapped.

    Raises:
        OutputError, DataError: as :func:`existing_map` (a file that is not ours, one of ours made otherwise).
    """
    assert item.out is not None
    return existing_scene_line(meta, item.source, item.out, opts, fingerprint)


def scene_lines(merged: BatchReport) -> list[dict[str, Any]]:
    """One JSON line per scene in input order: ``status`` done, exists or skipped (with its reason)."""
    lines = []
    for r in merged.results:
        if r.status == SKIPPED:
            lines.append(
                {"scene": r.item, "status": "skipped", "out": r.facts.get("out"), "reason": r.reason}
            )
        else:
            lines.append(r.facts)
    return lines


def report(results: list[dict[str, Any]], is_main: bool, checkpoint: str) -> int:
    """Print the per-scene JSON lines (main rank); the exit status: 0 all done, 2 some skipped, 1 none."""
    skipped = [r for r in results if r["status"] == "skipped"]
    done = len(results) - len(skipped)
    if is_main:
        for r in results:
            print(json.dumps(r))
        log.info("%d map(s) done, %d scene(s) skipped (model %s)", done, len(skipped), checkpoint)
        if skipped and not done:
            log.error("no scene could be mapped: %s", "; ".join(r["reason"] for r in skipped[:5]))
    return exit_status(done, len(skipped))


def list_scenes(items: Sequence[str], out: Path | None = None) -> list[Path]:
    """Files as given, folders searched recursively for rasters; a missing path is an error up front.

    In a folder, our own outputs are not scenes: maps of ours (their tags say so) and anything under ``out``
    when it lies inside that folder (``canopy-height sc --out sc/maps`` can be run again).
    """
    from foundation_domains.remote_sensing.raster import is_remote, list_rasters

    scenes: list[Path] = []
    for item in items:
        found = list_rasters(item)  # a URL stays a string; a list file gives its entries
        if not is_remote(item) and Path(item).is_dir():
            found = [f for f in found if not _our_output(f, Path(item), out)]
            if not found:
                raise DataError(f"data folder {item!r} holds only maps written by canopy-height; no scene")
        scenes.extend(found)
    return scenes


def _our_output(path: Path, folder: Path, out: Path | None) -> bool:
    """``path`` (found under ``folder``) lies in the ``out`` folder nested inside it, or is a map of ours."""
    from foundation_domains.remote_sensing.canopy.cog import map_tags

    nested_out = out is not None and folder.resolve() in out.resolve().parents
    if nested_out and out.resolve() in path.resolve().parents:
        return True
    return map_tags(path) is not None


def output_paths(scenes: list[Path], out: Path, protected: Sequence[Path] = ()) -> list[Path]:
    """``--out x.tif`` for one scene, else ``OUT/<stem>_chm.tif`` (stems must then be unique). Nothing is
    created; every check that needs no model is made here, before any work.

    Raises:
        ConfigError: a .tif for several scenes, or two scenes that would write the same file.
        OutputError: an output (or its quicklook, or the folder) that is, holds or links to a scene or a
            ``protected`` path (the checkpoint); a file where a folder is needed; a folder we cannot write in.
    """
    from foundation_domains.remote_sensing.raster import is_remote

    scenes_on_disk = [s for s in scenes if not is_remote(s)]  # a URL cannot be overwritten by a local file
    check_not_input(out, scenes_on_disk)
    if out.suffix.lower() in (".tif", ".tiff") and not out.is_dir():
        paths = [_single_output(scenes, out)]
    else:
        paths = _folder_outputs(scenes, out)
    for p in paths:
        check_not_input(p, [*scenes_on_disk, *protected])
        check_not_input(p.with_suffix(".png"), [*scenes_on_disk, *protected], flag="the quicklook")
    folder = paths[0].parent
    check_writable(folder)
    return paths


def _single_output(scenes: list[Path], out: Path) -> Path:
    if len(scenes) != 1:
        raise ConfigError(f"--out {str(out)!r} is a file but {len(scenes)} scenes were given; give a folder")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    return out


def _folder_outputs(scenes: list[Path], out: Path) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} exists and is not a folder; give a folder for the maps")
    from foundation_domains.remote_sensing.raster import raster_stem

    paths = [out / f"{raster_stem(s)}{OUT_SUFFIX}" for s in scenes]
    seen: dict[Path, Path] = {}
    for s, p in zip(scenes, paths, strict=True):
        if p in seen:
            raise ConfigError(f"{seen[p]} and {s} would both write {p}; rename one or map them separately")
        seen[p] = s
    return paths


def make_output_folder(folder: Path) -> None:
    """Create the folder the maps go to (with its parents), once the model is known to load.

    Raises:
        OutputError: it cannot be created (e.g. a read-only parent), naming it and the reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, folder, "--out: cannot create the folder") from e


def model_fingerprint(net: torch.nn.Module, meta: CanopyMeta) -> str:
    """What makes the map: the weights and the checkpoint's reading of the data (bands, scale, statistics),
    as stored (``to_dict``), so maps made before the metadata was typed keep their fingerprint."""
    from foundation.models.fingerprint import weights_fingerprint

    reading = json.dumps(meta.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(f"{weights_fingerprint(net)}\0{reading}".encode()).hexdigest()[:16]


def check_tile(net: torch.nn.Module, opts: MapOptions) -> None:
    """The tile must be a multiple of the backbone's patch size."""
    patch = int(getattr(getattr(net, "backbone", None), "patch_size", 1) or 1)
    if opts.tile % patch:
        raise ConfigError(f"--tile {opts.tile} must be a multiple of the backbone's patch size {patch}")


# -- one scene -----------------------------------------------------------------------------------------------
def map_scene_safely(net: torch.nn.Module, meta: CanopyMeta, src: Path, dst: Path, opts: MapOptions) -> dict:
    """:func:`map_scene`, with a bad scene turned into a ``skipped`` summary (batch jobs go on)."""
    try:
        return map_scene(net, meta, src, dst, opts)
    except FoundationError as e:
        log.error("skipping %s: %s", src, e)
        return {"scene": str(src), "status": "skipped", "out": str(dst), "reason": str(e)}


def map_scene(
    net: torch.nn.Module,
    meta: CanopyMeta,
    src: Path,
    dst: Path,
    opts: MapOptions,
    *,
    fingerprint: str | None = None,
) -> dict:
    """Map ``src`` to the COG ``dst`` (and ``dst.png`` with ``quicklook``); returns a summary. ``fingerprint``:
    :func:`model_fingerprint` of ``net`` and ``meta``, computed once by a batch (else here).

    Raises:
        DataError: the scene cannot be read or mapped (the message names the file), or ``dst`` is a map of
            ours by another model or of another scene and ``overwrite`` is off; ``dst`` is untouched.
        OutputError: ``dst`` or its quicklook exists and is not ours (never replaced), or cannot be written
            (a full disk: "no space left on device"); no temporary file is left.
        ConfigError: bad options.
    """
    import rasterio

    from foundation_domains.remote_sensing.canopy import cog
    from foundation_domains.remote_sensing.canopy.reference import find_reference
    from foundation_domains.remote_sensing.canopy.tiling import TileGrid, blend_tiles
    from foundation_domains.remote_sensing.raster import gdal_env, raster_name

    fingerprint = fingerprint or model_fingerprint(net, meta)
    done = existing_scene_line(meta, src, dst, opts, fingerprint)
    if done is not None:
        return done
    png = dst.with_suffix(".png")
    max_height = float(meta.max_height)
    reference = find_reference(src, opts.labels) if opts.quicklook else None
    if opts.quicklook:
        check_quicklook(png, opts.overwrite)
    t0 = time.perf_counter()
    part = temporary_name(dst.with_name(f"{dst.stem}.part{dst.suffix}"))  # the COG's own is another name
    env = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    try:
        with rasterio.Env(**env), gdal_env(src), open_scene(src, meta, opts) as scene:
            grid = TileGrid(scene.ds.height, scene.ds.width, opts.tile, opts.overlap)
            tags = {"model": cog.MAP_KIND, **source_identity(src), "units": "m", "fingerprint": fingerprint}
            with (
                cog.strip_writer(
                    part,
                    height=grid.height,
                    width=grid.width,
                    crs=scene.ds.crs,
                    transform=scene.ds.transform,
                    tags=tags,
                    name=dst,
                ) as write_rows,
                _progress(len(grid), raster_name(src), opts.quiet) as bar,
            ):
                counts = blend_tiles(
                    net,
                    scene.read,
                    grid,
                    write_rows,
                    batch_size=opts.batch_size,
                    device=opts.device,
                    precision=opts.precision,
                    chunk_width=opts.chunk_width,
                    progress=bar.update,
                )
            check_mapped(src, counts.valid, counts.nonfinite, grid.height * grid.width)
            cog.write_cog(part, dst, overwrite=opts.overwrite)
            if opts.quicklook:
                cog.write_quicklook(dst, png, max_height=max_height)
    finally:
        part.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    pixels = grid.height * grid.width
    summary = {
        "scene": str(src),
        "status": "done",
        "out": str(dst),
        "height": grid.height,
        "width": grid.width,
        "tiles": len(grid),
        "valid_fraction": round(counts.valid / pixels, 4),
        "nonfinite_fraction": round(counts.nonfinite / pixels, 4),
        "seconds": round(seconds, 2),
        "mpx_s": round(pixels / 1e6 / max(seconds, 1e-9), 3),
    }
    if scene.resampled:
        summary["resampled_gsd_m"] = scene.gsd
    if opts.quicklook:
        summary["quicklook"] = str(png)
    log.info("%s -> %s (%.1f s)", src, dst, seconds)
    return _with_reference(summary, dst, reference)


def _with_reference(summary: dict[str, Any], dst: Path, reference: Path | None) -> dict[str, Any]:
    """The comparison plots of a map with its reference, when there is one."""
    if reference is None:
        return summary
    from foundation_domains.remote_sensing.canopy.reference import reference_plots

    try:
        return {**summary, **reference_plots(dst, reference)}
    except DataError as e:  # the map is done; only its comparison could not be made
        log.warning("%s: no comparison with %s: %s", dst, reference, e)
        return {**summary, "reference": str(reference), "reference_error": str(e)}


def existing_scene_line(
    meta: CanopyMeta, src: Path, dst: Path, opts: MapOptions, fingerprint: str
) -> dict[str, Any] | None:
    """The JSON line of a scene this model already mapped (``"status": "exists"``; a missing quicklook asked for
    is drawn, the reference plots compared again), None when ``dst`` is to be written.

    Raises:
        OutputError, DataError: as :func:`existing_map`; DataError for reference plots that clash with ``dst``.
    """
    from foundation_domains.remote_sensing.canopy.reference import check_reference_plots, find_reference
    from foundation_domains.remote_sensing.raster import is_remote

    reference = find_reference(src, opts.labels) if opts.quicklook else None
    if reference is not None:
        check_reference_plots(dst, [reference] if is_remote(src) else [src, reference])
    if not existing_map(dst, src, fingerprint, opts.overwrite):
        return None
    png = dst.with_suffix(".png")
    return _with_reference(_existing(dst, src, png, opts, float(meta.max_height)), dst, reference)


def existing_map(dst: Path, src: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when ``dst`` already is this model's map of ``src`` and ``overwrite`` is off (nothing to do);
    False when ``dst`` may be written (absent, or a map of ours and ``overwrite``).

    Raises:
        OutputError: ``dst`` exists and is not a map of ours: never replaced, even with ``overwrite``.
        DataError: a map of ours of another input (another path, or this one before it changed: its size
            or modification time differ) or by another model, and ``overwrite`` is off.
    """
    from foundation_domains.remote_sensing.canopy.cog import map_tags

    if not dst.exists():
        return False
    tags = map_tags(dst)
    if tags is None:
        raise OutputError(
            f"{dst} exists and is not a canopy-height map written by foundation; it was left alone "
            "(move it or choose another --out)"
        )
    if overwrite:
        return False
    same_input = all(tags.get(k) == v for k, v in source_identity(src).items())
    if same_input and tags.get("fingerprint") == fingerprint:
        return True
    if not same_input:
        what = f"exists for another input ({tags.get('source_path') or tags.get('source')!r}"
        if tags.get("source_path") == source_identity(src)["source_path"]:
            what = "exists for this input as it was before it changed (size or modification time"
        raise DataError(f"{dst} {what}); not done: pass --overwrite to replace it")
    raise DataError(f"{dst} exists (a map of this input by another model); pass --overwrite to replace it")


def source_identity(src: Path) -> dict[str, str]:
    """The tags that say which input a map is of: its resolved path, size and modification time (a map of
    another file of the same name, or of this file before it changed, is not this input's map). A URL is known
    by the URL alone, an http(s) one without its query (a re-signed URL is the same scene; a remote file that
    changed under the same URL is not noticed)."""
    from foundation.data.listing import url_key
    from foundation_domains.remote_sensing.raster import is_remote, raster_name

    if is_remote(src):
        unknown = "unknown"  # GDAL drops empty tags
        return {
            "source": raster_name(src),
            "source_path": url_key(str(src)),
            "source_size": unknown,
            "source_mtime_ns": unknown,
        }
    st = src.stat()
    return {
        "source": src.name,
        "source_path": str(src.resolve()),
        "source_size": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
    }


def check_quicklook(png: Path, overwrite: bool) -> None:
    """Raises: OutputError for a PNG that is not a quicklook of ours; DataError for one of ours without
    ``overwrite``."""
    from foundation_domains.remote_sensing.canopy.cog import is_our_quicklook

    if not png.exists():
        return
    if not is_our_quicklook(png):
        raise OutputError(
            f"{png} exists and is not a quicklook written by foundation; it was left alone "
            "(move it, choose another --out, or drop --quicklook)"
        )
    if not overwrite:
        raise DataError(f"{png} exists; pass --overwrite to replace it")


def _existing(dst: Path, src: Path, png: Path, opts: MapOptions, max_height: float) -> dict:
    """The summary of a scene already mapped by this model; a missing quicklook asked for is written."""
    from foundation_domains.remote_sensing.canopy.cog import write_quicklook

    summary = {"scene": str(src), "status": "exists", "out": str(dst)}
    if opts.quicklook:
        if png.exists():
            check_quicklook(png, overwrite=True)
        else:
            write_quicklook(dst, png, max_height=max_height)
        summary["quicklook"] = str(png)
    log.info("%s: %s is already its map by this model", src, dst)
    return summary


def check_mapped(src: Path, valid: int, nonfinite: int, pixels: int) -> None:
    """Log the share of NaN/infinite pixels (mapped as missing); refuse a scene with nothing to map.

    Raises:
        DataError: every pixel is nodata, NaN or infinite (an all-NaN map is never reported as done).
    """
    if nonfinite:
        log.warning(
            "%s: %.1f%% of the pixels are NaN or infinite; treated as nodata (NaN in the map)",
            src, 100 * nonfinite / pixels,
        )  # fmt: skip
    if valid == 0:
        if nonfinite == pixels:
            raise DataError(f"{src}: every pixel is NaN or infinite; nothing to map")
        also = " or NaN/infinite" if nonfinite else ""
        raise DataError(f"{src}: every pixel is nodata{also}; nothing to map")


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

    def read(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised pixels, the valid mask and the mask of NaN/infinite pixels of a window."""
        from rasterio.errors import RasterioError
        from rasterio.windows import Window

        from foundation_domains.remote_sensing.raster import read_error_text

        try:
            return self.norm.read_chunk(self.ds, self.bands, self.scale, Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as e:
            raise DataError(
                f"{self.path}: read error in rows {r0}-{r1}, columns {c0}-{c1}: {read_error_text(e)}"
            ) from e


@contextlib.contextmanager
def open_scene(path: Path, meta: CanopyMeta, opts: MapOptions) -> Iterator[Scene]:
    """Open ``path``, check it against the checkpoint, and give a :class:`Scene` (resampled if asked).

    Raises:
        DataError: unreadable, wrong band count (naming both counts), or ``--resample`` without a CRS.
    """
    from foundation_domains.remote_sensing.raster import inspect_raster, open_raster, value_scale

    bands = meta.bands
    with open_raster(path) as ds:  # a file GDAL cannot open is named by open_raster
        count = ds.count
    if bands and max(bands) > count:
        raise DataError(
            f"{path}: has {count} band(s), but the checkpoint reads bands {list(bands)} "
            f"({len(bands)} band(s)); map scenes of the sensor it was trained on"
        )
    info = inspect_raster(path, bands)
    expected = meta.in_chans
    if info.channels != expected:
        raise DataError(
            f"{path}: gives {info.channels} band(s) (bands {','.join(map(str, info.bands))}) but the "
            f"checkpoint's model takes {expected} (select bands when fine-tuning, or map scenes of the "
            "sensor it was trained on)"
        )
    if info.crs is None:
        log.info("%s: no CRS, so the map has none either", path)
    from foundation_domains.remote_sensing.canopy.data import Normalization

    norm = Normalization(tuple(meta.mean), tuple(max(float(v), 1e-6) for v in meta.std), opts.nodata)
    scale = value_scale(info, meta.scale)
    with open_raster(path) as ds:
        gsd, train_gsd = scene_gsd(ds), meta.gsd
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
