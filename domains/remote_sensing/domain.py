"""The ``remote_sensing`` domain: multispectral rasters of any band count, DINOv2 multi-crop or MAE views.

The band count and normalisation are properties of the data, so the domain learns them when it first sees
it: :meth:`RemoteSensingDomain.sample_source` and :meth:`~RemoteSensingDomain.eval_dataset` inspect the
rasters and set ``channels``, ``mean`` and ``std`` (from a statistics file, explicit values, or an estimate
over a bounded random sample of windows). Until then they describe the embedded sample scene.

rasterio is imported only when data is touched, so ``foundation --help`` stays fast and a missing install
says how to fix it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domains.remote_sensing.options import RasterOptions, parse_bands
from foundation.config import Config
from foundation.data.views import ImageViews, MAEView, MultiCropViews
from foundation.domain import ViewTransform
from foundation.errors import ConfigError, MissingDependencyError

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


class RemoteSensingDomain:
    """Multispectral rasters (GeoTIFF, COG, VRT, JPEG2000, any GDAL format) with nodata-aware sampling."""

    name = "remote_sensing"
    spatial_dims = 2

    def __init__(self) -> None:
        self.channels: int = SAMPLE_BANDS
        self.mean: Sequence[float] = (0.0,) * SAMPLE_BANDS
        self.std: Sequence[float] = (1.0,) * SAMPLE_BANDS
        self.stats = None  # BandStats of the data seen last, when estimated or loaded
        self.rgb = False  # every raster's selected bands are red, green, blue

    def make_sample(self, root: Path) -> Path:
        _require_rasterio()
        from domains.remote_sensing.sample import make_sample_scene

        return make_sample_scene(Path(root))

    # -- data --------------------------------------------------------------------------------------------------
    def _configure(self, infos: list, scales: list[float], opts: RasterOptions, seed: int) -> set[str]:
        """Set channels, mean, std and rgb for ``infos``, in scaled (reflectance-like) units; returns the
        files that estimating the statistics found unreadable (none when they are given)."""
        from domains.remote_sensing.stats import UNREADABLE, BandStats, compute_band_stats

        channels = infos[0].channels
        self.stats = None
        unreadable: set[str] = set()
        if opts.mean is not None:
            mean, std, source = opts.mean, opts.std, "data.options.mean/std"
        elif opts.stats:
            self.stats = BandStats.load(opts.stats)
            _check_stats(self.stats, opts, channels)
            mean, std, source = self.stats.mean, self.stats.std, opts.stats
        else:
            self.stats = compute_band_stats(
                infos,
                scales,
                bands=opts.bands,
                scale_option=opts.scale,
                nodata=opts.nodata,
                window=STATS_WINDOW,
                max_windows=opts.stats_windows,
                seed=seed,
            )
            mean, std = self.stats.mean, self.stats.std
            source = f"{self.stats.windows} windows of {self.stats.files} raster(s)"
            unreadable = {s["file"] for s in self.stats.skipped if s["kind"] == UNREADABLE}
        if len(mean) != channels:
            raise ConfigError(f"{source}: {len(mean)} values for {channels} bands")
        self.channels = channels
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(max(float(s), 1e-6) for s in std)  # a constant band must not divide by zero
        self.rgb = channels == 3 and all(i.is_rgb for i in infos)
        log.info(
            "remote_sensing: %d raster(s), %d bands, normalisation from %s: mean %s std %s",
            len(infos), channels, source, _fmt(self.mean), _fmt(self.std),
        )  # fmt: skip
        return unreadable

    def sample_source(self, path: str, cfg: Config):
        """Random windows of ``window_scale x global_size`` pixels from the rasters at ``path``.

        Files the statistics pass could not read are left out (named in its log); one that fails later, in
        some of its windows, is handled by the sampler (another window is drawn for that sample).
        """
        _require_rasterio()
        from domains.remote_sensing.raster import scan_rasters, value_scale
        from domains.remote_sensing.sampling import RasterSampleSource

        opts = RasterOptions.from_config(cfg.data.options)
        infos = scan_rasters(path, opts.bands)
        scales = [value_scale(i, opts.scale) for i in infos]
        unreadable = self._configure(infos, scales, opts, cfg.seed)
        if unreadable:
            log.warning("remote_sensing: %d unreadable raster(s) left out of training", len(unreadable))
            kept = [k for k, info in enumerate(infos) if info.path not in unreadable]
            infos, scales = [infos[k] for k in kept], [scales[k] for k in kept]
        size = cfg.data.crops.global_size
        return RasterSampleSource(
            infos,
            scales,
            self.mean,
            window=max(size, round(size * opts.window_scale)),
            min_valid=opts.min_valid,
            nodata=opts.nodata,
        )

    def ssl_transform(self, cfg: Config) -> ViewTransform:
        """Flips and 90-degree rotations (rasters have no "up"); colour ops only on red-green-blue data."""
        opts = RasterOptions.from_config(cfg.data.options)
        color = self.rgb if opts.color == "auto" else bool(opts.color)
        crops = cfg.data.crops
        if cfg.ssl.method == "mae":
            return ImageViews(
                MAEView(crops.global_size, self.mean, self.std, rot90=True, max_pixel_value=1.0)
            )
        views = MultiCropViews(
            crops, self.mean, self.std, color=color, solarize=color, rot90=True, max_pixel_value=1.0
        )
        return ImageViews(views)

    def eval_dataset(self, path: str, cfg: Config):
        """Labelled chips in class sub-folders, centre-cropped and resized to ``data.crops.global_size``.

        Normalise with the backbone's statistics (``data.options.stats`` or ``mean``/``std``); without them
        they are estimated from the chips themselves.
        """
        _require_rasterio()
        from domains.remote_sensing.chips import RasterChipDataset, scan_chips
        from domains.remote_sensing.raster import value_scale

        opts = RasterOptions.from_config(cfg.data.options)
        infos = scan_chips(path, opts.bands)
        scales = [value_scale(i, opts.scale) for i in infos]
        self._configure(infos, scales, opts, cfg.seed)
        return RasterChipDataset(
            path, infos, scales, cfg.data.crops.global_size, self.mean, self.std, opts.nodata
        )

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: a window of each raster (see ``visualize.py``)."""
        _require_rasterio()
        from domains.remote_sensing.visualize import visual_inputs

        return visual_inputs(request)


def cmd_stats(args: argparse.Namespace) -> int:
    """``foundation stats``: compute, write, print a one-line JSON summary; the batch exit status.

    Files that cannot be read, or hold no valid pixel, are skipped and named (``skipped`` in the summary and
    in the statistics file); 0 every file used, 2 some skipped, 1 nothing usable (a ``DataError``). ``--out``
    replaces only an earlier statistics file of ours, never another file or an input (checked before work).
    """
    _require_rasterio()
    from domains.remote_sensing.raster import find_rasters, list_rasters, value_scale
    from domains.remote_sensing.stats import UNREADABLE, check_stats_output, compute_band_stats
    from foundation.batch import exit_status

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
