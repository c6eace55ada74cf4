"""The ``remote_sensing`` domain: multispectral rasters of any band count, DINOv2 multi-crop or MAE views.

The band count and normalisation are properties of the data: :meth:`RemoteSensingDomain.sample_source`
inspects the rasters and returns them as a :class:`~foundation.data.spec.DataSpec` (statistics from a
statistics file, explicit values, or an estimate over a bounded random sample of windows). Before any data is
seen, ``default_spec`` describes the embedded sample scene.

rasterio is imported only when data is touched, so ``foundation --help`` stays fast and a missing install
says how to fix it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundation.config import Config
from foundation.data.spec import DataSpec
from foundation.data.views import ImageViews, MAEView, MultiCropViews
from foundation.domain import DataSource, ViewTransform
from foundation.errors import ConfigError, MissingDependencyError
from foundation_domains.remote_sensing.options import RasterOptions, parse_bands

if TYPE_CHECKING:
    from foundation.visualize.inputs import VisualInput, VisualRequest

log = logging.getLogger(__name__)

SAMPLE_BANDS = 6  # the embedded scene's band count, the domain's channels until it has seen data
STATS_WINDOW = 256  # side of the windows read when statistics are estimated


def _require_rasterio() -> None:
    if importlib.util.find_spec("rasterio") is None:
        raise MissingDependencyError(
            "the remote_sensing domain reads rasters with rasterio: pip install 'foundation[remote_sensing]'"
        )


@dataclass(frozen=True)
class Normalisation:
    """What :func:`normalisation` found for a set of rasters: their spec, the statistics file's content (when
    estimated or loaded) and the files that estimating the statistics could not read."""

    spec: DataSpec
    stats: Any = None  # BandStats
    unreadable: frozenset[str] = frozenset()


def normalisation(infos: list, scales: list[float], opts: RasterOptions, seed: int) -> Normalisation:
    """The spec of ``infos`` in scaled (reflectance-like) units: channels, mean/std from ``opts`` (explicit
    values or a statistics file) or estimated over a bounded random sample of windows, and band names."""
    from foundation_domains.remote_sensing.stats import UNREADABLE, BandStats, compute_band_stats

    channels = infos[0].channels
    stats = None
    unreadable: set[str] = set()
    if opts.mean is not None:
        mean, std, source = opts.mean, opts.std, "data.options.mean/std"
    elif opts.stats:
        stats = BandStats.load(opts.stats)
        _check_stats(stats, opts, channels)
        mean, std, source = stats.mean, stats.std, opts.stats
    else:
        stats = compute_band_stats(
            infos,
            scales,
            bands=opts.bands,
            scale_option=opts.scale,
            nodata=opts.nodata,
            window=STATS_WINDOW,
            max_windows=opts.stats_windows,
            seed=seed,
        )
        mean, std = stats.mean, stats.std
        source = f"{stats.windows} windows of {stats.files} raster(s)"
        unreadable = {s["file"] for s in stats.skipped if s["kind"] == UNREADABLE}
    if len(mean) != channels:
        raise ConfigError(f"{source}: {len(mean)} values for {channels} bands")
    names = infos[0].colorinterp if all(i.colorinterp == infos[0].colorinterp for i in infos) else None
    spec = DataSpec(
        channels,
        2,
        tuple(float(m) for m in mean),
        tuple(max(float(s), 1e-6) for s in std),  # a constant band must not divide by zero
        tuple(names) if names else None,
    )
    log.info(
        "remote_sensing: %d raster(s), %d bands, normalisation from %s: mean %s std %s",
        len(infos), channels, source, _fmt(spec.mean), _fmt(spec.std),
    )  # fmt: skip
    return Normalisation(spec, stats, frozenset(unreadable))


class RemoteSensingDomain:
    """Multispectral rasters (GeoTIFF, COG, VRT, JPEG2000, any GDAL format) with nodata-aware sampling."""

    name = "remote_sensing"
    options_type = RasterOptions
    # the embedded sample scene's bands, in scaled units, before any data is seen
    default_spec = DataSpec(SAMPLE_BANDS, 2, (0.0,) * SAMPLE_BANDS, (1.0,) * SAMPLE_BANDS)

    def make_sample(self, root: Path) -> Path:
        _require_rasterio()
        from foundation_domains.remote_sensing.sample import make_sample_scene

        return make_sample_scene(Path(root))

    def sample_source(self, path: str, cfg: Config) -> DataSource:
        """Random windows of ``window_scale x global_size`` pixels from the rasters at ``path``, and their spec
        (the source also keeps the statistics as ``stats``, for ``foundation stats``-like reuse).

        Files the statistics pass could not read are left out (named in its log); one that fails later, in
        some of its windows, is handled by the sampler (another window is drawn for that sample).
        """
        _require_rasterio()
        from foundation_domains.remote_sensing.raster import scan_rasters, value_scale
        from foundation_domains.remote_sensing.sampling import RasterSampleSource

        opts: RasterOptions = cfg.data.typed_options
        infos = scan_rasters(path, opts.bands)
        scales = [value_scale(i, opts.scale) for i in infos]
        found = normalisation(infos, scales, opts, cfg.seed)
        if found.unreadable:
            log.warning("remote_sensing: %d unreadable raster(s) left out of training", len(found.unreadable))
            kept = [k for k, info in enumerate(infos) if info.path not in found.unreadable]
            infos, scales = [infos[k] for k in kept], [scales[k] for k in kept]
        size = cfg.data.crops.global_size
        source = RasterSampleSource(
            infos,
            scales,
            found.spec.mean,
            window=max(size, round(size * opts.window_scale)),
            min_valid=opts.min_valid,
            nodata=opts.nodata,
        )
        source.stats = found.stats
        return DataSource(source, found.spec)

    def ssl_transform(self, cfg: Config, spec: DataSpec) -> ViewTransform:
        """Flips and 90-degree rotations (rasters have no "up"); colour ops only on red-green-blue data."""
        opts: RasterOptions = cfg.data.typed_options
        color = spec.is_rgb if opts.color == "auto" else bool(opts.color)
        crops = cfg.data.crops
        if cfg.ssl.method == "mae":
            return ImageViews(
                MAEView(crops.global_size, spec.mean, spec.std, rot90=True, max_pixel_value=1.0)
            )
        views = MultiCropViews(
            crops, spec.mean, spec.std, color=color, solarize=color, rot90=True, max_pixel_value=1.0
        )
        return ImageViews(views)

    def eval_dataset(self, path: str, cfg: Config, spec: DataSpec | None = None):
        """Labelled chips in class sub-folders, centre-cropped and resized to ``data.crops.global_size``.

        Normalised with ``spec``'s statistics (the backbone's, or the training data's) when they have the chips'
        band count, else with ``data.options.stats`` or ``mean``/``std``, else statistics of the chips themselves.
        """
        _require_rasterio()
        from foundation_domains.remote_sensing.chips import RasterChipDataset, scan_chips
        from foundation_domains.remote_sensing.raster import value_scale

        opts: RasterOptions = cfg.data.typed_options
        infos = scan_chips(path, opts.bands)
        scales = [value_scale(i, opts.scale) for i in infos]
        if spec is None or spec.channels != infos[0].channels:
            spec = normalisation(infos, scales, opts, cfg.seed).spec
        return RasterChipDataset(
            path, infos, scales, cfg.data.crops.global_size, spec.mean, spec.std, opts.nodata
        )

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: a window of each raster (see ``visualize.py``)."""
        _require_rasterio()
        from foundation_domains.remote_sensing.visualize import visual_inputs

        return visual_inputs(request)


def cmd_stats(args: argparse.Namespace) -> int:
    """``foundation stats``: compute, write, print a one-line JSON summary; the batch exit status.

    Files that cannot be read, or hold no valid pixel, are skipped and named (``skipped`` in the summary and
    in the statistics file); 0 every file used, 2 some skipped, 1 nothing usable (a ``DataError``). ``--out``
    replaces only an earlier statistics file of ours, never another file or an input (checked before work).
    """
    _require_rasterio()
    from foundation.batch import exit_status
    from foundation_domains.remote_sensing.raster import find_rasters, list_rasters, value_scale
    from foundation_domains.remote_sensing.stats import UNREADABLE, check_stats_output, compute_band_stats

    inputs = [Path(args.data), *list_rasters(args.data)]
    check_stats_output(Path(args.out), inputs)
    bands = parse_bands(args.bands, key="--bands")
    scale: str | float = args.scale if args.scale == "auto" else float(args.scale)
    infos, unreadable = find_rasters(args.data, bands)
    stats = compute_band_stats(
        infos,
        [value_scale(i, scale) for i in infos],
        bands=bands,
        scale_option=scale,
        nodata=args.nodata,
        window=args.window,
        max_windows=args.max_windows,
        seed=args.seed,
        progress=not args.quiet,
    )
    stats.skipped = [{**s, "kind": UNREADABLE} for s in unreadable] + stats.skipped
    out = stats.save(args.out, inputs)
    log.info("band statistics of %d raster(s) written to %s", stats.files, out)
    summary = {"stats": str(out), "bands": len(stats.mean), "files": stats.files, "pixels": stats.pixels}
    summary.update(nonfinite_fraction=stats.nonfinite, skipped=stats.skipped)
    print(json.dumps(summary))
    return exit_status(stats.files, len(stats.skipped))


def _check_stats(stats: Any, opts: RasterOptions, channels: int) -> None:
    """A statistics file must describe the bands and units this run reads."""
    wanted = list(opts.bands) if opts.bands else None
    if stats.bands != wanted or not _same_scale(stats.scale, opts.scale) or len(stats.mean) != channels:
        raise ConfigError(
            f"data.options.stats={opts.stats!r} was computed for bands={stats.bands}, scale={stats.scale!r} "
            f"({len(stats.mean)} bands); this run reads bands={wanted}, scale={opts.scale!r} ({channels} bands). "
            "Recompute it with `foundation stats DATA --bands ... --scale ... --out FILE`"
        )


def _same_scale(a: object, b: object) -> bool:
    if a == "auto" or b == "auto":
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
