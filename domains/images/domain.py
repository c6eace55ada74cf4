"""The built-in ``images`` domain: RGB images from a folder, DINOv2 multi-crop or MAE views."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from domains.images.sample import make_sample_images
from foundation.config import Config, reject_unknown_keys
from foundation.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    ImageFolderDataset,
    ImageSampleSource,
)
from foundation.data.views import ImageViews, MAEView, MultiCropViews
from foundation.domain import ViewTransform

if TYPE_CHECKING:
    from foundation.visualize.inputs import VisualInput, VisualRequest


class ImagesDomain:
    """A folder of ordinary images: the path for custom data and for tests."""

    name = "images"
    channels = 3
    spatial_dims = 2
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def make_sample(self, root: Path) -> Path:
        return make_sample_images(Path(root))

    def sample_source(self, path: str, cfg: Config) -> ImageSampleSource:
        reject_unknown_keys(cfg.data.options, (), "data.options", "the images domain")
        return ImageSampleSource(ImageFolder.scan(path), cfg.seed)

    def ssl_transform(self, cfg: Config) -> ViewTransform:
        crops = cfg.data.crops
        if cfg.ssl.method == "mae":
            return ImageViews(MAEView(crops.global_size, self.mean, self.std))
        return ImageViews(MultiCropViews(crops, self.mean, self.std))

    def eval_dataset(self, path: str, cfg: Config) -> ImageFolderDataset:
        return ImageFolderDataset(ImageFolder.scan(path), cfg.data.crops.global_size, self.mean, self.std)

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: image files or folders (see ``visualize.py``)."""
        from domains.images.visualize import visual_inputs

        return visual_inputs(request, tuple(self.mean), tuple(self.std))
