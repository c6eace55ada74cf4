"""The ``pathology`` domain: tissue tiles streamed from whole-slide images, with the pathology SSL recipe.

Recipe changes from natural images (PathDino, UNI, Virchow, Phikon reports): slides have no "up", so
90-degree rotations and vertical flips; HED stain jitter once per tile (the same draw for all its crops);
weaker colour jitter; no solarize.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from foundation.config import Config
from foundation.data.device_views import DeviceMAEView, DeviceMultiCropViews, augment_on_device
from foundation.data.image_folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageFolderDataset
from foundation.data.spec import DataSpec
from foundation.data.views import ImageViews, MAEView, MultiCropViews
from foundation.domain import DataSource, ViewTransform
from foundation_domains.pathology.sample import make_sample_slide
from foundation_domains.pathology.source import (
    PathologyOptions,
    SlideSampleSource,
    list_slides,
    read_mpp_csv,
)
from foundation_domains.pathology.stain import HEDJitter, HEDJitterOnDevice

if TYPE_CHECKING:
    from foundation.visualize.inputs import VisualInput, VisualRequest
    from foundation_domains.pathology.slide_refs import SlideRef

log = logging.getLogger(__name__)

# ImageNet statistics, as UNI and most public pathology backbones use: fine-tuning from RGB weights then needs no
# re-normalisation. Tiles are RGB whatever the slide, so this is also the spec of any data.
RGB = DataSpec(3, 2, IMAGENET_MEAN, IMAGENET_STD, ("red", "green", "blue"))


class PathologyDomain:
    """Whole-slide images (every format OpenSlide reads, plus OME-TIFF and plain TIFF through tifffile)."""

    name = "pathology"
    options_type = PathologyOptions
    default_spec = RGB

    def make_sample(self, root: Path) -> Path:
        return make_sample_slide(Path(root))

    def sample_source(self, path: str, cfg: Config) -> DataSource:
        options: PathologyOptions = cfg.data.typed_options
        table = read_mpp_csv(options.mpp_csv) if options.mpp_csv else None
        slides = list_slides(path)
        names: dict[SlideRef, str] | None = None
        if options.slides_csv:  # only the slides the list names; the others it names are reported
            from foundation_domains.pathology.feature_names import output_names
            from foundation_domains.pathology.slide_list import select_slides

            slides = list(slides)
            if options.regions:  # regions are named as embed names the slides of the whole folder
                stems = [n.removesuffix(".h5") for n in output_names(slides, Path(path))]
                names = dict(zip(slides, stems, strict=True))
            choice = select_slides(options.slides_csv, slides, Path(path))
            for item in choice.missing:
                log.warning("slide list: %s", item["reason"])
            slides = choice.chosen
        source = SlideSampleSource(slides, options, cfg.seed, root=Path(path), mpp_table=table, names=names)
        return DataSource(source, RGB)

    def ssl_transform(self, cfg: Config, spec: DataSpec) -> ViewTransform:
        """The pathology recipe. With ``data.augment_on`` resolving to the device (a CUDA run), workers only
        read tiles and cut uint8 crops, and stain jitter, colour ops and normalisation run batched on the GPU
        (``device_transform``), so a worker's time goes to reading slides; otherwise workers do it all."""
        options: PathologyOptions = cfg.data.typed_options
        mean, std = spec.mean, spec.std
        crops = cfg.data.crops
        mae = cfg.ssl.method == "mae"
        if augment_on_device(cfg.data):
            stain = [HEDJitterOnDevice(options.hed_scale, options.hed_shift)]
            if mae:
                return ImageViews(DeviceMAEView(crops.global_size, mean, std, rot90=True, tile_ops=stain))
            views = DeviceMultiCropViews(
                crops, mean, std, rot90=True, solarize=False, color_strength=0.5, tile_ops=stain
            )
            return ImageViews(views)
        pre = [HEDJitter(options.hed_scale, options.hed_shift, p=1.0)]
        if mae:
            return ImageViews(MAEView(crops.global_size, mean, std, rot90=True, pre=pre))
        views = MultiCropViews(crops, mean, std, rot90=True, solarize=False, color_strength=0.5, pre=pre)
        return ImageViews(views)

    def eval_dataset(self, path: str, cfg: Config, spec: DataSpec | None = None) -> ImageFolderDataset:
        """Labelled tile images in class sub-folders (the layout of public patch benchmarks)."""
        # the backbone's statistics when they are RGB's; other channel counts are refused by the caller
        spec = spec if spec is not None and spec.channels == RGB.channels else RGB
        return ImageFolderDataset(ImageFolder.scan(path), cfg.data.crops.global_size, spec.mean, spec.std)

    def embed_data(self, backbone: torch.nn.Module, meta: dict[str, Any], args: argparse.Namespace) -> dict:
        """``foundation embed --domain pathology``: one HDF5 of tile features per slide (see ``embed.py``)."""
        from foundation_domains.pathology.embed import embed_slides

        return embed_slides(backbone, meta, args)

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: slide regions, tissue tiles, feature-file tiles (``visualize.py``)."""
        from foundation_domains.pathology.visualize import visual_inputs

        return visual_inputs(request, RGB.mean, RGB.std)
