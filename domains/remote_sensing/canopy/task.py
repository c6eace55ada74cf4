"""``foundation finetune canopy-height`` and ``foundation evaluate canopy-height``.

A DPT head on the pretrained ViT learns canopy height from image rasters and lidar-derived height rasters
(Tolan et al. 2023, arXiv 2304.07213), trained by the pretraining engine (resume, DDP, AMP come with it).
Normalisation, bands, scale and the head's shape are stored with the model (:class:`.meta.CanopyMeta`), because
statistics that differ between training and map making silently ruin the maps
(shared/reference/remote_sensing.md).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from foundation.config import RECIPES, Config, reject_unknown_keys
from foundation.errors import ConfigError, DataError
from foundation.models.vit import ViT
from foundation.options import path_field
from foundation.tasks.base import TaskParts, add_config_flag
from foundation.tasks.loaded import LoadedTask
from foundation.train.distributed import resolve_device
from foundation_domains.remote_sensing.canopy.data import (
    RESAMPLING,
    CanopyTileDataset,
    Normalization,
    Pair,
    check_band_count,
    image_gsd,
    inspect_images,
    make_canopy_sample,
    match_pairs,
    open_pair,
    read_pair,
)
from foundation_domains.remote_sensing.canopy.head import HeadOptions
from foundation_domains.remote_sensing.canopy.losses import CanopyLoss, LossOptions
from foundation_domains.remote_sensing.canopy.meta import TASK_NAME, CanopyMeta
from foundation_domains.remote_sensing.canopy.metrics import CanopyMetrics, scalar_metrics
from foundation_domains.remote_sensing.canopy.model import CanopyNet, build_canopy_net, load_canopy
from foundation_domains.remote_sensing.canopy.plots import check_error_plots, write_error_plots
from foundation_domains.remote_sensing.json_outputs import check_json_output, write_json_output
from foundation_domains.remote_sensing.options import parse_bands
from foundation_domains.remote_sensing.raster import RasterInfo, inspect_raster, value_scale

log = logging.getLogger(__name__)

CONFIG = RECIPES / "remote_sensing" / "canopy_tiny.yaml"
STATS_WINDOW = 256
METRICS_KIND = "canopy-height-metrics"  # the marker of our metrics files (the only files --out replaces)
METRICS_KEYS = ("checkpoint", "done", "skipped", "rmse", "height_bins")  # ours written before the marker


@dataclass(frozen=True)
class CanopyOptions:
    """``task.options`` of the canopy-height recipes.

    Attributes:
        head: the DPT head (:class:`~foundation_domains.remote_sensing.canopy.head.HeadOptions`).
        loss: the loss (:class:`~foundation_domains.remote_sensing.canopy.losses.LossOptions`).
        tile_size: training windows in pixels (a multiple of the patch size); also the evaluation tile.
        min_valid: fraction of labelled pixels a training window should have.
        bands: 1-based image bands (the ``--bands`` flag sets it); default every band but alpha.
        scale: divisor to reflectance-like units, as the remote_sensing domain (``auto`` or a number).
        nodata: image nodata value (raw units) for files that declare none.
        label_nodata: label nodata value for label files that declare none.
        resampling: how labels on another grid are resampled onto the image's: ``bilinear`` or ``nearest``.
        stats_windows: 256-px windows read to estimate band statistics when the backbone has none for the bands.
    """

    head: HeadOptions = field(default_factory=HeadOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    tile_size: int = 64
    min_valid: float = 0.5
    bands: tuple[int, ...] | None = None
    scale: str | float = "auto"
    nodata: float | None = None
    label_nodata: float | None = None
    resampling: str = "bilinear"
    stats_windows: int = 64

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Any = None) -> CanopyOptions:
        """``task.options`` as written (typed once, when the config loads: ``cfg.task.typed_options``).

        Raises:
            ConfigError: unknown key or bad value, named as ``task.options.KEY``.
        """
        reject_unknown_keys(options, cls, "task.options", "canopy-height")
        values = dict(options)
        values["head"] = HeadOptions.from_options(values.get("head"))
        values["loss"] = LossOptions.from_options(values.get("loss"))
        values["bands"] = parse_bands(values.get("bands"), key="task.options.bands")
        opts = cls(**values)
        if opts.resampling not in RESAMPLING:
            raise ConfigError(f"task.options.resampling={opts.resampling!r} is not one of {list(RESAMPLING)}")
        if not 0 <= opts.min_valid <= 1:
            raise ConfigError(f"task.options.min_valid={opts.min_valid!r} must be in [0, 1]")
        if opts.tile_size < 1 or opts.stats_windows < 1:
            raise ConfigError("task.options.tile_size and task.options.stats_windows must be >= 1")
        return opts


@dataclass(frozen=True)
class CanopyInputs:
    """``task.inputs`` of canopy height (the ``finetune`` flags of the same names fill them).

    Attributes:
        images, labels: image rasters and canopy-height rasters (metres) with the same file names; neither:
            the embedded sample.
        val_images, val_labels: validation pairs, scored every ``train.eval_every`` steps.
    """

    images: str | None = path_field()
    labels: str | None = path_field()
    val_images: str | None = path_field()
    val_labels: str | None = path_field()


def _pairs(images: str | None, labels: str | None, flags: str = "--images/--labels") -> list[Pair]:
    """The user's pairs, or the embedded sample when neither folder is given."""
    if bool(images) != bool(labels):
        raise ConfigError(f"{flags}: give both folders (or neither, for the embedded sample)")
    if not images:
        from foundation.domain import sample_cache_dir

        root = make_canopy_sample(sample_cache_dir("canopy-height"))
        log.info("no --images/--labels: using the embedded sample in %s", root)
        images, labels = str(root / "images"), str(root / "labels")
    return match_pairs(images, labels)


def _check_labels(pairs: list[Pair], opts: CanopyOptions) -> None:
    """Open every pair once, so a label that does not overlap its image stops the run before training."""
    for pair in pairs:
        with open_pair(pair, opts.resampling, opts.label_nodata):
            pass


def _single_scale(infos: list[RasterInfo], scales: list[float], option: str | float) -> str | float:
    """The divisor every training image used (what map making must use), or the option if they differ."""
    return scales[0] if len(set(scales)) == 1 else option


def _normalisation(
    infos: list[RasterInfo], scales: list[float], opts: CanopyOptions, backbone_meta: dict, seed: int
) -> Normalization:
    """The backbone's own statistics when they fit the bands, else statistics of the training images."""
    from foundation_domains.remote_sensing.stats import compute_band_stats

    channels = infos[0].channels
    mean, std = backbone_meta.get("mean") or (), backbone_meta.get("std") or ()
    if len(mean) == channels and len(std) == channels:
        log.info("canopy-height: normalising with the backbone's statistics")
    else:
        stats = compute_band_stats(
            infos,
            scales,
            bands=infos[0].bands,
            scale_option=opts.scale,
            nodata=opts.nodata,
            window=STATS_WINDOW,
            max_windows=opts.stats_windows,
            seed=seed,
        )
        mean, std = stats.mean, stats.std
        log.info("canopy-height: band statistics from %d windows of the training images", stats.windows)
    return Normalization(
        mean=tuple(float(m) for m in mean),
        std=tuple(max(float(s), 1e-6) for s in std),
        nodata=opts.nodata,
    )


def evaluate_pairs(
    net: CanopyNet,
    pairs: list[Pair],
    meta: CanopyMeta,
    device: torch.device,
    *,
    tile: int,
    overlap: int,
    batch_size: int,
    resampling: str = "bilinear",
    label_nodata: float | None = None,
    progress: bool = False,
    skip_broken: bool = False,
    metrics: CanopyMetrics | None = None,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Whole-image predictions with blended overlapping tiles, scored against the labels (into ``metrics``
    when given, so the caller can also draw from its sums).

    Returns:
        The metrics and the pairs skipped (``skip_broken``) with their reasons.
    """
    from foundation_domains.remote_sensing.canopy.tiling import predict_image

    norm = Normalization(mean=meta.mean, std=meta.std, nodata=meta.nodata)
    bands = meta.bands
    metrics, skipped = metrics if metrics is not None else CanopyMetrics(), []
    for pair in tqdm(pairs, desc="canopy-height evaluation", unit="image", disable=not progress):
        try:
            info = inspect_raster(pair.image, bands)
            check_band_count(info, meta.in_chans, "the model")
            image, valid, label = read_pair(
                pair, norm, info.bands, value_scale(info, meta.scale), resampling, label_nodata
            )
        except (DataError, ConfigError) as e:
            if not skip_broken:
                raise
            log.warning("skipping %s: %s", pair.image, e)
            skipped.append({"image": str(pair.image), "label": str(pair.label), "reason": str(e)})
            continue
        pred = predict_image(
            net, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device, valid=valid
        )
        metrics.add(pred, label)
    return metrics.compute(), skipped


class CanopyHeightTask:
    """Canopy height (metres) per pixel: DPT head, masked regression or binned classification."""

    name = TASK_NAME
    domain = "remote_sensing"
    default_config = CONFIG
    options_type = CanopyOptions
    inputs_type = CanopyInputs

    # -- finetune --------------------------------------------------------------------------------------------
    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        flag = add_config_flag
        flag(
            parser,
            "--images",
            "task.inputs.images",
            help="folder (or file) of image rasters; default: the embedded sample",
        )
        flag(
            parser,
            "--labels",
            "task.inputs.labels",
            help="canopy-height rasters (metres) with the images' file names",
        )
        flag(
            parser,
            "--val-images",
            "task.inputs.val_images",
            help="validation images, scored every train.eval_every steps",
        )
        flag(
            parser,
            "--val-labels",
            "task.inputs.val_labels",
            help="validation labels (same file names as --val-images)",
        )
        flag(
            parser,
            "--bands",
            "task.options.bands",
            help="1-based image bands in order, e.g. 4,3,2,8 (default: all)",
        )

    def build(self, cfg: Config, backbone: ViT, backbone_meta: dict[str, Any]) -> TaskParts:
        opts: CanopyOptions = cfg.task.typed_options
        inputs: CanopyInputs = cfg.task.typed_inputs
        head, loss_opts = opts.head, opts.loss
        if opts.tile_size % backbone.patch_size:
            raise ConfigError(
                f"task.options.tile_size={opts.tile_size} is not a multiple of the backbone's patch size "
                f"{backbone.patch_size}"
            )
        bands = opts.bands
        pairs = _pairs(inputs.images, inputs.labels)
        infos = inspect_images(pairs, bands)
        random_init = backbone_meta.get("source") == "random-init"
        check_band_count(
            infos[0],
            backbone.in_chans,
            "the random-init backbone (set model.in_chans)" if random_init else "the backbone",
        )
        _check_labels(pairs, opts)
        scales = [value_scale(i, opts.scale) for i in infos]
        norm = _normalisation(infos, scales, opts, backbone_meta, cfg.seed)
        net = build_canopy_net(backbone, head.to_dict())
        meta = CanopyMeta(
            head=head.to_dict(),
            in_chans=backbone.in_chans,
            mean=norm.mean,
            std=norm.std,
            bands=tuple(bands) if bands else None,
            scale=_single_scale(infos, scales, opts.scale),
            tile_size=opts.tile_size,
            gsd=image_gsd(pairs[0].image),
            max_height=float(head.max_height),
            nodata=opts.nodata,  # the image nodata value map making must honour too
        )
        dataset = CanopyTileDataset(
            pairs,
            infos,
            scales,
            norm,
            tile=opts.tile_size,
            seed=cfg.seed,
            min_valid=opts.min_valid,
            resampling=opts.resampling,
            label_nodata=opts.label_nodata,
        )
        validate = self._validator(inputs, opts, meta)
        centers = net.bin_centers.clone() if head.mode == "bins" else None
        return TaskParts(
            net=net,
            loss=CanopyLoss(head.mode, loss_opts, centers),
            dataset=dataset,
            validate=validate,
            meta=meta,
        )

    def data_channels(self, cfg: Config) -> int:
        """Bands of the first training image after ``task.options.bands``: what a ``--random-init`` backbone
        takes."""
        inputs: CanopyInputs = cfg.task.typed_inputs
        pairs = _pairs(inputs.images, inputs.labels)
        return inspect_images(pairs[:1], cfg.task.typed_options.bands)[0].channels

    def _validator(self, inputs: CanopyInputs, opts: CanopyOptions, meta: CanopyMeta):
        images, labels = inputs.val_images, inputs.val_labels
        if not images and not labels:
            return None
        if not (images and labels):
            raise ConfigError("--val-images and --val-labels go together")
        pairs = match_pairs(images, labels)
        for info in inspect_images(pairs, meta.bands):
            check_band_count(info, meta.in_chans, "the backbone")
        _check_labels(pairs, opts)
        tile = opts.tile_size

        def validate(net: torch.nn.Module, device: torch.device) -> dict[str, float]:
            result, _ = evaluate_pairs(
                net, pairs, meta, device, tile=tile, overlap=tile // 4, batch_size=16,
                resampling=opts.resampling, label_nodata=opts.label_nodata,
            )  # fmt: skip
            return scalar_metrics(result)

        return validate

    def load(self, path: str | Path) -> LoadedTask[CanopyMeta]:
        """The fine-tuned network (eval mode) and its :class:`CanopyMeta`; see :func:`.model.load_canopy`."""
        return load_canopy(path)

    # -- evaluate --------------------------------------------------------------------------------------------
    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="RUN folder, RUN/model.pt or a checkpoint")
        parser.add_argument("--images", help="image rasters; default: the embedded sample")
        parser.add_argument("--labels", help="canopy-height rasters with the images' file names")
        parser.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
        parser.add_argument("--tile", type=int, help="tile size in pixels; default: the training tile size")
        parser.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles; default tile/4")
        parser.add_argument(
            "--resampling", choices=sorted(RESAMPLING), default="bilinear", help="labels on another grid"
        )
        parser.add_argument("--label-nodata", type=float, help="label nodata for files that declare none")
        parser.add_argument(
            "--out",
            help="also write the metrics JSON to this file (atomically), and beside it <stem>_density.png "
            "(predicted vs true height) and <stem>_height_bins.png (error per height bin); an existing file is "
            "replaced only if this command wrote it, never another file or an input",
        )

    def evaluate(self, args: argparse.Namespace) -> dict[str, Any]:
        """Metrics of a fine-tuned model over image/label pairs; broken pairs are skipped and reported.

        The result holds ``done`` (pairs scored) and ``skipped`` (the others, with reasons), from which the
        CLI derives the batch exit status (0 all scored, 2 some skipped); none scored is a ``DataError``.
        """
        pairs = _pairs(args.images, args.labels)
        folders = [Path(f) for f in (args.images, args.labels) if f]
        inputs = [Path(args.checkpoint), *folders, *(p.image for p in pairs), *(p.label for p in pairs)]
        if args.out:
            check_metrics_output(Path(args.out), inputs)
            check_error_plots(Path(args.out).with_suffix(""), inputs)
        model = self.load(args.checkpoint)
        net, meta = model.net, model.meta
        device = resolve_device(getattr(args, "device", "auto"))
        net.to(device)
        tile = args.tile or meta.tile_size
        overlap = tile // 4 if args.overlap is None else args.overlap
        metrics = CanopyMetrics()
        with torch.inference_mode():
            result, skipped = evaluate_pairs(
                net, pairs, meta, device, tile=tile, overlap=overlap, batch_size=args.batch_size,
                resampling=args.resampling, label_nodata=args.label_nodata,
                progress=not getattr(args, "quiet", False), skip_broken=True, metrics=metrics,
            )  # fmt: skip
        done = len(pairs) - len(skipped)
        result = {"checkpoint": str(args.checkpoint), **result, "done": done, "skipped": skipped}
        if not done:
            raise DataError(f"no image could be evaluated (first: {skipped[0]['reason']})")
        if args.out:
            check_metrics_output(Path(args.out), inputs)  # again: it may have appeared while we evaluated
            result["plots"] = write_error_plots(
                metrics, Path(args.out).with_suffix(""), Path(args.checkpoint).name
            )
            write_json_output(Path(args.out), METRICS_KIND, result)
        if skipped:  # the CLI prints the metrics of the rest; the exit status says some were skipped
            log.warning(
                "%d of %d image(s) skipped (first: %s); the metrics are over the others",
                len(skipped), len(pairs), skipped[0]["reason"],
            )  # fmt: skip
        return result


def check_metrics_output(out: Path, inputs: list[Path]) -> None:
    """``--out`` may only be new or an earlier metrics file of ours; never an input or another file.

    Raises:
        OutputError: naming ``out`` and why it was left alone.
    """
    check_json_output(out, METRICS_KIND, inputs, legacy_keys=METRICS_KEYS)
