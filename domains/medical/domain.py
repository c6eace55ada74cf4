"""The ``medical`` domain: CT and MR volumes (NIfTI, DICOM series) for 3D MAE and 2D-slice DINOv2 pretraining.

The 3D recipe is MAE with cubic patches on cubic crops (arXiv 2111.06377; UNETR-style backbones,
arXiv 2103.10504); the 2D recipe is DINOv2 on axial slices (arXiv 2312.02366). The intensity preset (CT window or
MR percentiles to [0, 1]) is the normalisation of 3D crops, so their mean/std are 0/1 per channel; 2D slices are
standardised with the slices' own statistics. Channels, dimensions and statistics come back from
:meth:`MedicalDomain.sample_source` as a :class:`~foundation.data.spec.DataSpec`.
nibabel, pydicom and MONAI are imported only when data is touched, so ``foundation --help`` stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from foundation.config import Config
from foundation.data.spec import DataSpec
from foundation.domain import DataSource, ViewTransform
from foundation.errors import ConfigError, DataError, FoundationError, MissingDependencyError
from foundation_domains.medical.options import VolumeOptions

if TYPE_CHECKING:
    from foundation.visualize.inputs import VisualInput, VisualRequest

log = logging.getLogger(__name__)


class NotAvailableYetError(FoundationError, NotImplementedError):
    """A medical feature planned in issue 7 that this version does not have yet."""


def _require_medical() -> None:
    missing = [m for m in ("nibabel", "pydicom") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"the medical domain reads volumes with {' and '.join(missing)}: pip install 'foundation[medical]'"
        )


def slice_mode(cfg: Config) -> bool:
    """2D slices (DINOv2, or MAE with ``model.spatial_dims: 2``) or 3D crops (MAE).

    Raises:
        ConfigError: DINOv2 asked for on 3D crops (its multi-crop recipe is 2D).
    """
    dims = cfg.model.spatial_dims or (2 if cfg.ssl.method == "dinov2" else 3)
    if cfg.ssl.method == "dinov2" and dims == 3:
        raise ConfigError(
            "ssl.method=dinov2 with model.spatial_dims=3: the medical domain runs DINOv2 on 2D slices "
            "(foundation/recipes/medical/dinov2_slices_tiny.yaml) and MAE on 3D crops (foundation/recipes/medical/tiny.yaml)"
        )
    return dims == 2


class MAEVolumeView:
    """MAE's single view of a crop: random flips along the three axes and a small intensity scale/shift,
    then per-channel normalisation. Flips are safe for self-supervision even though anatomy is not
    mirror-symmetric; the intensity jitter stays small so the CT window keeps its meaning."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: float = 0.1, shift: float = 0.1):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
        self.scale, self.shift = scale, shift

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        x = sample["image"]
        dims = [d + 1 for d, flip in enumerate(torch.rand(3, generator=generator) < 0.5) if flip]
        if dims:
            x = torch.flip(x, dims)
        a, b = (torch.rand(2, generator=generator) * 2 - 1).tolist()
        x = x * (1 + a * self.scale) + b * self.shift
        return {"image": ((x - self.mean) / self.std).float().contiguous()}


def unit_spec(channels: int, spatial_dims: int) -> DataSpec:
    """Intensities already in [0, 1] by the preset: mean 0, std 1 per channel."""
    return DataSpec(channels, spatial_dims, (0.0,) * channels, (1.0,) * channels)


class MedicalDomain:
    """3D CT/MR volumes: NIfTI files and DICOM series folders, reoriented to RAS and resampled."""

    name = "medical"
    options_type = VolumeOptions
    default_spec = unit_spec(1, 3)  # one CT channel, 3D crops, until the data and recipe say otherwise

    def make_sample(self, root: Path) -> Path:
        _require_medical()
        from foundation_domains.medical.phantom import make_sample_volumes

        return make_sample_volumes(Path(root))

    def sample_source(self, path: str, cfg: Config) -> DataSource:
        """Random ``global_size^3`` crops (3D) or axial slices (2D) of the volumes at ``path``, and their spec:
        channels from the data, dimensions from the recipe, slice statistics in 2D.

        Raises:
            ConfigError: DINOv2 on 3D crops.
            DataError: nothing usable at ``path``, or volumes with different channel counts.
        """
        _require_medical()
        from foundation_domains.medical.slices import SliceSampleSource, slice_statistics
        from foundation_domains.medical.source import VolumeSampleSource
        from foundation_domains.medical.volume import channel_count, find_volumes, read_image

        slices = slice_mode(cfg)  # before the data is scanned and a model built for nothing
        opts: VolumeOptions = cfg.data.typed_options
        volumes = find_volumes(path)
        counts = {}
        for v in volumes:  # NIfTI headers only; DICOM series are always one channel and checked on load
            counts[v] = 1 if v.is_dir() else channel_count(read_image(v), v, opts.expected_channels)
        if len(set(counts.values())) > 1:
            by = {c: str(p) for p, c in counts.items()}
            raise DataError(
                f"{path}: volumes have different channel counts: {by}; train on one kind at a time"
            )
        channels = next(iter(counts.values()))
        log.info(
            "medical: %d volume(s) at %s, %d channel(s), %s preset, spacing %s mm, %s",
            len(volumes), path, channels, opts.modality, opts.spacing or "native",
            "2D axial slices" if slices else "3D crops",
        )  # fmt: skip
        if slices:
            source = SliceSampleSource(volumes, opts, cfg.data.crops.global_size)
            mean, std = slice_statistics(source, cfg.seed)
            log.info("medical: 2D views standardised with the slices' mean %s, std %s", mean, std)
            return DataSource(source, DataSpec(channels, 2, mean, std))
        volume_source = VolumeSampleSource(volumes, opts, cfg.data.crops.global_size)
        return DataSource(volume_source, unit_spec(channels, 3))

    def ssl_transform(self, cfg: Config, spec: DataSpec) -> ViewTransform:
        """3D: MAE views of crops. 2D slices: the shared multi-crop (DINOv2) or MAE view pipelines on [0, 1]
        float images, without colour jitter or solarisation (intensities are calibrated: HU windows)."""
        if not slice_mode(cfg):
            return MAEVolumeView(spec.mean, spec.std)
        from foundation.data.views import ImageViews, MAEView, MultiCropViews

        if cfg.ssl.method == "mae":
            return ImageViews(MAEView(cfg.data.crops.global_size, spec.mean, spec.std, max_pixel_value=1.0))
        views = MultiCropViews(
            cfg.data.crops, spec.mean, spec.std, color=False, solarize=False, max_pixel_value=1.0
        )
        return ImageViews(views)

    def eval_dataset(self, path: str, cfg: Config, spec: DataSpec | None = None):
        """Slice backbones: ``ROOT/<class>/<volume>``, every axial slice an item of its folder's class, read as
        pretraining reads it, normalised with ``spec`` (the backbone's or the training slices' statistics; else
        0/1). 3D backbones have no kNN/linear protocol here (volumes carry no class labels)."""
        if not slice_mode(cfg):
            raise NotAvailableYetError(
                "kNN/linear probes of 3D medical backbones are not available (volumes carry no class labels); "
                "judge one by organ segmentation: `foundation finetune organ-segmentation --backbone RUN --data "
                "DATALIST.json`, then `foundation evaluate organ-segmentation`"
            )
        _require_medical()
        from foundation_domains.medical.slices import LabelledSliceDataset

        spec = spec or unit_spec(1, 2)
        opts: VolumeOptions = cfg.data.typed_options
        return LabelledSliceDataset(path, opts, cfg.data.crops.global_size, spec.mean, spec.std)

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]:
        """``foundation visualize`` inputs: axial/coronal/sagittal planes of volumes (see ``visualize.py``)."""
        _require_medical()
        from foundation_domains.medical.visualize import visual_inputs

        return visual_inputs(request)
