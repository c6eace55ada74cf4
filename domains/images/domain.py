"""The built-in ``images`` domain: RGB images from a folder, DINOv2 multi-crop or MAE views."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foundation.config import Config
from foundation.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolder,
    ImageFolderDataset,
    ImageSampleSource,
)
from foundation.data.spec import DataSpec
from foundation.data.views import ImageViews, MAEView, MultiCropViews
from foundation.domain import DataSource, ViewTransform
from foundation.errors import ConfigError
from foundation_domains.images.sample import make_sample_images

if TYPE_CHECKING:
    from foundation.visualize.inputs import VisualInput, VisualRequest


@dataclass(frozen=True)
class ImagesOptions:
    """``data.options`` of the images domain (any other key is refused by name).

    ``color_jitter`` scales DINOv2's colour-jitter amplitudes (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1
    at 1.0, DINOv2's own); 0 turns the jitter and the random grayscale off, for data whose grey level or contrast
    tells the classes apart (lightly's ``cj_strength``).
    """

    color_jitter: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.color_jitter, (int, float)) and not 0 <= self.color_jitter <= 2:
            raise ConfigError(
                f"data.options.color_jitter={self.color_jitter!r} must be in [0, 2] (1 = DINOv2's)"
            )


RGB = DataSpec(3, 2, IMAGENET_MEAN, IMAGENET_STD, ("red", "green", "blue"))


class ImagesDomain:
    """A folder of ordinary images: the path for custom data and for tests."""

    name = "images"
    options_type = ImagesOptions
    default_spec = RGB  # every image is read as RGB, normalised with ImageNet statistics

    def make_sample(self, root: Path) -> Path:
        return make_sample_images(Path(root))

    def sample_source(self, path: str, cfg: Config) -> DataSource:
        return DataSource(ImageSampleSource(ImageFolder.scan(path), cfg.seed), RGB)

    def ssl_transform(self, cfg: Config, spec: DataSpec) -> ViewTransform:
        crops = cfg.data.crops
        if cfg.ssl.method == "mae":
            return ImageViews(MAEView(crops.global_size, spec.mean, spec.std))
        options: ImagesOptions = cfg.data.typed_options  # typed when the config loaded
        return ImageViews(MultiCropViews(crops, spec.mean, spec.std, color_strength=options.color_jitter))

    def eval_dataset(self, path: str, cfg: Config, spec: DataSpec | None = None) -> ImageFolderDataset:
        # the backbone's statistics when they are RGB's; other channel counts are refused by the caller
        spec = spec if spec is not None and spec.channels == RGB.channels else RGB
        return ImageFolderDataset(ImageFolder.scan(path), cfg.data.crops.global_size, spec.mean, spec.std)

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: image files or folders (see ``visualize.py``)."""
        from foundation_domains.images.visualize import visual_inputs

        return visual_inputs(request, RGB.mean, RGB.std)
