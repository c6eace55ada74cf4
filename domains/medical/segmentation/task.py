"""``foundation finetune organ-segmentation``: a UNETR-style head on the 3D ViT, trained the MONAI way.

DiceCE loss (``monai.losses.DiceCELoss``) on positive/negative crops of a MONAI/Decathlon datalist; validation
by Gaussian-weighted sliding-window inference (overlap 0.5) on whole preprocessed volumes and per-organ Dice
(``monai.metrics.DiceMetric``), the BTCV protocol of UNETR (arXiv 2103.10504). Without ``--data`` it trains on the
medical domain's synthetic CT phantoms (liver, kidneys, spleen, vertebrae).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
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
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.segmentation.datalist import Datalist, load_datalist, sample_datalist
from foundation_domains.medical.segmentation.meta import TASK_NAME, SegmentationMeta
from foundation_domains.medical.segmentation.model import build_segmentation_net, load_segmentation

log = logging.getLogger(__name__)
NORMS = ("instance", "batch")  # MONAI norm names that need no extra arguments
RECIPE = RECIPES / "medical" / "organseg_tiny.yaml"


@dataclass(frozen=True)
class SegmentationOptions:
    """``task.options`` of organ segmentation (the volume preset itself is ``data.options``, as in pretraining).

    Attributes:
        roi_size: training crop and sliding-window size (voxels after resampling; multiples of the patch size).
        feature_size: decoder channels at full resolution (UNETR: 16).
        norm_name: norm of the decoder's conv blocks.
        dropout: before the output conv.
        val_fraction: share of ``training`` held out when the datalist has no ``validation`` list.
        flip_prob, rot90_prob: augmentation probabilities (per axis for flips).
        overlap, sw_batch_size: sliding-window inference.
        labels: ``{name: value}`` when the datalist has no ``labels``; default: read from the label maps.
    """

    roi_size: tuple[int, int, int] = (96, 96, 96)
    feature_size: int = 16
    norm_name: str = "instance"
    dropout: float = 0.0
    val_fraction: float = 0.2
    flip_prob: float = 0.1
    rot90_prob: float = 0.1
    overlap: float = 0.5
    sw_batch_size: int = 4
    labels: dict[str, int] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any], cfg: Any = None) -> SegmentationOptions:
        """``task.options`` as written (typed once, when the config loads: ``cfg.task.typed_options``).

        Raises:
            ConfigError: naming the ``task.options`` key and what it accepts.
        """
        reject_unknown_keys(options, cls, "task.options", "organ-segmentation")
        kw = dict(options)
        if "roi_size" in kw:
            roi = kw["roi_size"]
            roi = [roi] * 3 if isinstance(roi, int) else roi
            if not (
                isinstance(roi, (list, tuple))
                and len(roi) == 3
                and all(isinstance(s, int) and s > 0 for s in roi)
            ):
                raise ConfigError(f"task.options.roi_size={kw['roi_size']!r} must be 3 positive integers")
            kw["roi_size"] = tuple(roi)
        for key, low, high in (("val_fraction", 0.0, 0.9), ("flip_prob", 0.0, 1.0), ("rot90_prob", 0.0, 1.0)):
            if key in kw and not low <= float(kw[key]) <= high:
                raise ConfigError(f"task.options.{key}={kw[key]!r} must be in [{low}, {high}]")
        if "overlap" in kw and not 0.0 <= float(kw["overlap"]) < 1.0:
            raise ConfigError(f"task.options.overlap={kw['overlap']!r} must be in [0, 1)")
        for key in ("feature_size", "sw_batch_size"):
            if key in kw and (not isinstance(kw[key], int) or kw[key] < 1):
                raise ConfigError(f"task.options.{key}={kw[key]!r} must be an integer >= 1")
        if "norm_name" in kw and kw["norm_name"] not in NORMS:
            raise ConfigError(f"task.options.norm_name={kw['norm_name']!r} is not one of {list(NORMS)}")
        if kw.get("labels") is not None:
            kw["labels"] = _check_labels(kw["labels"], "task.options.labels")
        return cls(**kw)


@dataclass(frozen=True)
class SegmentationInputs:
    """``task.inputs`` of organ segmentation (flags ``--data``, ``--data-root``).

    Attributes:
        data: MONAI/Decathlon datalist JSON; None: the synthetic CT phantoms.
        data_root: folder the datalist's relative paths start from; None: the datalist's folder.
    """

    data: str | None = path_field()
    data_root: str | None = path_field()


def _check_labels(labels: Any, where: str) -> dict[str, int]:
    if not isinstance(labels, dict) or not all(isinstance(v, int) and v >= 0 for v in labels.values()):
        raise ConfigError(
            f"{where}={labels!r} must map organ names to label values, e.g. {{background: 0, liver: 1}}"
        )
    if 0 not in labels.values():
        raise ConfigError(f"{where}={labels!r} must include the background value 0")
    return {str(k): int(v) for k, v in labels.items()}


def _labels_from_maps(entries: list[dict[str, str]]) -> dict[str, int]:
    """Class names ``class_<v>`` for every value found in the training label maps (background 0)."""
    import nibabel as nib
    import numpy as np

    values: set[int] = {0}
    for e in entries:
        values |= {int(v) for v in np.unique(np.asarray(nib.load(e["label"]).dataobj))}
    return {("background" if v == 0 else f"class_{v}"): v for v in sorted(values)}


def task_meta(
    opts: SegmentationOptions, vol: VolumeOptions, labels: dict[str, int], head: dict, in_chans: int
) -> SegmentationMeta:
    """What inference needs, stored in every checkpoint (and read by ``foundation segment`` and bundles)."""
    return SegmentationMeta(
        head=head,
        in_chans=in_chans,
        roi_size=tuple(opts.roi_size),
        num_classes=max(labels.values()) + 1,
        labels=labels,
        spacing=tuple(vol.spacing) if vol.spacing is not None else None,
        modality=vol.modality,
        window=tuple(vol.window),
        overlap=opts.overlap,
        sw_batch_size=opts.sw_batch_size,
    )


class DiceEvaluator:
    """Sliding-window inference on whole preprocessed volumes and per-organ Dice.

    With ``keep`` the preprocessed volumes stay in memory (validation runs many times during training). A pair
    that cannot be preprocessed is skipped with a warning and listed in ``skipped``; the others are scored.
    """

    def __init__(
        self, entries: list[dict[str, str]], meta: SegmentationMeta, *, keep: bool = True, quiet: bool = True
    ) -> None:
        self.entries, self.meta, self.keep, self.quiet = entries, meta, keep, quiet
        self._kept: dict[int, dict[str, torch.Tensor]] = {}
        self.skipped: list[str] = []

    def _volume(self, i: int) -> dict[str, torch.Tensor] | None:
        from foundation_domains.medical.segmentation.data import check_label_values
        from foundation_domains.medical.segmentation.transforms import preprocessing

        if i in self._kept:
            return self._kept[i]
        entry = self.entries[i]
        try:
            try:
                out = preprocessing(self.meta, keys=("image",), label_key="label")(dict(entry))
            except Exception as err:  # MONAI wraps reader errors in RuntimeError
                raise DataError(f"{entry['image']}: cannot preprocess this image/label pair ({err})") from err
            check_label_values(out["label"], self.meta.num_classes, entry["label"])
            if not torch.isfinite(out["image"]).all():  # a Dice of NaN inputs would score garbage
                raise DataError(f"{entry['image']}: NaN or infinite voxels; this pair cannot be scored")
        except DataError as err:
            log.warning("organ segmentation: skipping %s", err)
            self.skipped.append(entry["image"])
            return None
        volume = {k: out[k].as_tensor() for k in ("image", "label")}
        if self.keep:
            self._kept[i] = volume
        return volume

    def __call__(
        self,
        net: torch.nn.Module,
        device: torch.device,
        on_case: Callable[[int, dict[str, torch.Tensor], torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """Per-organ Dice; ``on_case(i, volume, predicted_classes)`` sees each scored case (e.g. for plots)."""
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot

        k = self.meta.num_classes
        metric = DiceMetric(include_background=False, reduction="mean_batch", get_not_nans=True)
        self.skipped = []
        scored = 0
        for i in tqdm(range(len(self.entries)), desc="dice", unit="vol", disable=self.quiet, leave=False):
            volume = self._volume(i)
            if volume is None:
                continue
            logits = sliding_window_inference(
                volume["image"][None].to(device),
                roi_size=list(self.meta.roi_size),
                sw_batch_size=self.meta.sw_batch_size or 1,
                predictor=net,
                overlap=self.meta.overlap,
                mode="gaussian",
            )
            classes = logits.argmax(1, keepdim=True)
            metric(y_pred=one_hot(classes, k), y=one_hot(volume["label"][None].to(device).long(), k))
            if on_case is not None:
                on_case(i, volume, classes[0, 0].cpu())
            scored += 1
        if not scored:
            raise DataError(
                f"none of the {len(self.entries)} image/label pair(s) could be scored: {self.skipped}"
            )
        dice, counted = (t.cpu().tolist() for t in metric.aggregate())  # classes 1..k-1
        names = self.meta.class_names()
        # a class in no ground truth has no Dice (MONAI would report 0): left out, not averaged in
        out = {
            f"dice/{names.get(c, f'class_{c}')}": d
            for c, (d, n) in enumerate(zip(dice, counted, strict=True), 1)
            if n > 0
        }
        if out:
            out["dice_mean"] = sum(out.values()) / len(out)
        return out


def _datalist(inputs: SegmentationInputs | argparse.Namespace, **kw: Any) -> Datalist:
    """The datalist of ``task.inputs`` (fine-tuning) or of the evaluate flags (same names)."""
    path = getattr(inputs, "data", None) or sample_datalist()
    return load_datalist(path, data_root=getattr(inputs, "data_root", None), **kw)


class OrganSegmentationTask:
    """Organ segmentation of CT/MR volumes (the ``foundation.tasks`` entry ``organ-segmentation``)."""

    name = TASK_NAME
    domain = "medical"
    default_config = RECIPE
    options_type = SegmentationOptions
    inputs_type = SegmentationInputs

    def add_finetune_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_flag(
            parser,
            "--data",
            "task.inputs.data",
            help="MONAI/Decathlon datalist JSON (training [+ validation] image/label pairs); "
            "default: synthetic CT phantoms",
        )
        add_config_flag(
            parser,
            "--data-root",
            "task.inputs.data_root",
            help="folder the datalist's relative paths start from; default: its folder",
        )

    def data_channels(self, cfg: Config) -> int | None:
        """``data.options.channels`` when the recipe fixes it (1 for CT); else the domain's default."""
        return cfg.data.typed_options.expected_channels

    def build(self, cfg: Config, backbone: ViT, backbone_meta: dict[str, Any]) -> TaskParts:
        """Check the datalist and the options against the backbone, then the network, DiceCE loss and crops.

        Raises:
            ConfigError: bad options, ROI not a multiple of the patch size, or channels backbone != data.
            DataError: bad datalist (every bad pair listed).
        """
        from monai.losses import DiceCELoss

        from foundation_domains.medical.segmentation.data import SegmentationCropDataset

        opts: SegmentationOptions = cfg.task.typed_options
        vol: VolumeOptions = cfg.data.typed_options
        if backbone.spatial_dims != 3:
            raise ConfigError(
                f"organ segmentation needs a 3D backbone; {backbone_meta.get('source', 'this one')} is 2D"
            )
        bad = [s for s in opts.roi_size if s % backbone.patch_size]
        if bad:
            raise ConfigError(
                f"task.options.roi_size={list(opts.roi_size)} must be multiples of the backbone's patch size "
                f"{backbone.patch_size}"
            )
        data = _datalist(
            cfg.task.typed_inputs, in_chans=backbone.in_chans, val_fraction=opts.val_fraction, seed=cfg.seed
        )
        labels = opts.labels or data.labels or _labels_from_maps(data.training)
        if 0 not in labels.values():
            labels = {"background": 0, **labels}
        head = {"out_channels": max(labels.values()) + 1, "feature_size": opts.feature_size}
        head.update(norm_name=opts.norm_name, dropout=opts.dropout)
        net = build_segmentation_net(backbone, head)
        meta = task_meta(opts, vol, labels, dict(net.head_args), backbone.in_chans)
        log.info(
            "organ segmentation: %d training / %d validation pairs from %s, %d classes %s, ROI %s",
            len(data.training), len(data.validation), data.path, meta.num_classes, sorted(labels), opts.roi_size,
        )  # fmt: skip
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

        def loss(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {"loss": dice_ce(logits.float(), batch["label"])}

        dataset = SegmentationCropDataset(
            data.training,
            meta,
            seed=cfg.seed,
            cache=vol.cache,
            flip_prob=opts.flip_prob,
            rot90_prob=opts.rot90_prob,
        )
        validate = DiceEvaluator(data.validation, meta) if data.validation else None
        return TaskParts(net=net, loss=loss, dataset=dataset, validate=validate, meta=meta)

    def load(self, path: str | Path) -> LoadedTask[SegmentationMeta]:
        """The fine-tuned network (eval mode) and its :class:`SegmentationMeta`; see
        :func:`.model.load_segmentation`."""
        return load_segmentation(path)

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--checkpoint", required=True, help="fine-tuned model: run folder, model.pt or checkpoint"
        )
        parser.add_argument("--data", help="datalist JSON; default: the synthetic CT phantoms")
        parser.add_argument(
            "--data-root", help="folder the datalist's relative paths start from; default: its folder"
        )
        parser.add_argument(
            "--split",
            default="validation",
            choices=["validation", "training"],
            help="datalist list to score (validation: held out as in training when the datalist has none)",
        )
        parser.add_argument(
            "--plots",
            help="a new folder for dice.png (per-organ Dice) and <case>_overlay.png (each case's middle organ "
            "slice with ground truth and prediction)",
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="replace an earlier --plots folder of ours"
        )

    def evaluate(self, args: argparse.Namespace) -> dict[str, Any]:
        """Per-organ Dice of a fine-tuned model on a datalist split: ``{"dice/<organ>": ..., "dice_mean": ...}``,
        ``done`` (pairs scored) and ``skipped`` (the images of pairs that could not be), which give the exit status
        (:func:`foundation.batch.exit_status`).

        Raises:
            CheckpointError: not an organ-segmentation model. DataError: bad datalist.
        """
        model = self.load(args.checkpoint)
        meta = model.meta
        options = model.config.get("task", {}).get("options", {})
        data = _datalist(
            args,
            in_chans=meta.in_chans,
            val_fraction=float(options.get("val_fraction", SegmentationOptions.val_fraction)),
            seed=int(model.config.get("seed", 0)),
        )
        entries = data.validation if args.split == "validation" else data.training
        if not entries:
            raise DataError(f"{data.path}: the {args.split} split is empty")
        plots = Path(args.plots) if getattr(args, "plots", None) else None
        if plots is not None:
            from foundation_domains.medical.segmentation.plots import case_slice, check_plots_folder

            inputs = [
                Path(args.checkpoint),
                Path(data.path),
                *(Path(e[k]) for e in entries for k in ("image", "label")),
            ]
            check_plots_folder(plots, bool(args.overwrite), inputs)
        device = resolve_device(getattr(args, "device", "auto"))
        net = model.net.to(device)
        evaluator = DiceEvaluator(entries, meta, keep=False, quiet=getattr(args, "quiet", False))
        names = meta.class_names()
        cases = []

        def keep_slice(i: int, volume: dict[str, torch.Tensor], classes: torch.Tensor) -> None:
            name = Path(entries[i]["image"]).name.split(".")[0]
            cases.append(case_slice(name, volume["image"], volume["label"], classes, names))

        with torch.no_grad():
            scores = evaluator(net, device, keep_slice if plots is not None else None)
        scored = len(entries) - len(evaluator.skipped)
        result = {**scores, "split": args.split, "volumes": scored, "done": scored}
        result["checkpoint"] = str(model.source)
        result["skipped"] = evaluator.skipped  # non-empty: the CLI prints the rest's scores and exits 2
        if evaluator.skipped:
            log.warning("%d image/label pair(s) skipped: %s", len(evaluator.skipped), evaluator.skipped)
        if plots is not None:
            from foundation_domains.medical.segmentation.plots import write_plots

            result["plots"] = write_plots(plots, scores, cases, meta, overwrite=bool(args.overwrite))
            log.info("plots in %s", plots)
        return result
