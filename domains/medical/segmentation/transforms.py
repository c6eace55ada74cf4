"""The deterministic preprocessing of organ segmentation, written once and emitted in two forms.

:func:`preprocessing_spec` is the single source: a list of MONAI dictionary transforms and their arguments, built
from the model's :class:`~foundation_domains.medical.segmentation.meta.SegmentationMeta`. :func:`preprocessing` instantiates it as a ``Compose`` (training, validation, ``foundation
segment``); :func:`preprocessing_config` writes it as MONAI bundle config entries (``{"_target_": "Orientationd",
...}``) for a bundle's ``inference.json``. The two cannot drift because both come from the same list.

The steps match the medical domain's reader (``domains/medical/volume.py``): channel first, RAS orientation,
resampling to ``spacing`` (bilinear for images, nearest for labels), then the intensity preset: CT clips the HU
``window`` and scales it to [0, 1]; MR maps each channel's 0.5/99.5 percentiles to [0, 1], clipped. A volume with
NaN or infinite voxels (missing data) stops before the preset and gets :func:`normalise_intensity`, which leaves
them out of the statistics and makes them background.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from foundation_domains.medical.segmentation.meta import SegmentationMeta

# MONAI's LoadImage probes an optional GPU DICOM decoder on every call and warns when it is absent (it falls
# back to pydicom, which is what we want): one line per volume of noise for every user without it.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)

MR_PERCENTILES = (0.5, 99.5)
# nibabel's world axes (what NIfTI affines mean); explicit, so MONAI's changing default cannot flip volumes
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def preprocessing_spec(
    meta: SegmentationMeta,
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    *,
    intensity: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """``[(monai.transforms name, JSON-able kwargs), ...]`` for the image ``keys`` (and an optional label map);
    ``intensity=False`` stops before the intensity preset (see :func:`normalise_intensity`).

    Raises:
        ValueError: ``meta.modality`` is neither ``ct`` nor ``mr``.
    """
    images = list(keys)
    every = images + ([label_key] if label_key else [])
    spec: list[tuple[str, dict[str, Any]]] = [
        ("LoadImaged", {"keys": every, "image_only": True, "dtype": "float32"}),
        ("EnsureChannelFirstd", {"keys": every}),
        ("Orientationd", {"keys": every, "axcodes": "RAS", "labels": RAS_LABELS}),
    ]
    if meta.spacing is not None:
        modes = ["bilinear"] * len(images) + (["nearest"] if label_key else [])
        spec.append(("Spacingd", {"keys": every, "pixdim": [float(s) for s in meta.spacing], "mode": modes}))
    modality = meta.modality
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality {modality!r} is not one of ['ct', 'mr']")
    if not intensity:
        return spec
    if modality == "ct":
        low, high = (float(v) for v in meta.window)
        spec.append(
            (
                "ScaleIntensityRanged",
                {"keys": images, "a_min": low, "a_max": high, "b_min": 0.0, "b_max": 1.0, "clip": True},
            )
        )
    elif modality == "mr":
        lower, upper = MR_PERCENTILES
        spec.append(
            (
                "ScaleIntensityRangePercentilesd",
                {
                    "keys": images,
                    "lower": lower,
                    "upper": upper,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                    "channel_wise": True,
                },
            )
        )
    return spec


def preprocessing(
    meta: SegmentationMeta,
    keys: Sequence[str] = ("image",),
    label_key: str | None = None,
    *,
    intensity: bool = True,
):
    """The preprocessing as a ``monai.transforms.Compose`` of dictionary transforms (paths in, arrays out)."""
    import monai.transforms as mt

    spec = preprocessing_spec(meta, keys, label_key, intensity=intensity)
    return mt.Compose([getattr(mt, name)(**kwargs) for name, kwargs in spec])


def normalise_intensity(image: torch.Tensor, missing: torch.Tensor, meta: SegmentationMeta) -> torch.Tensor:
    """The intensity preset of ``meta`` on a ``C x D x H x W`` image with ``missing`` voxels (a boolean mask of
    the same shape: NaN or infinite in the input). Missing voxels are left out of the statistics (the MR
    percentiles) and set to 0, the background after either preset; the other voxels get exactly what the
    MONAI transforms of :func:`preprocessing_spec` give them."""
    import monai.transforms as mt

    image = torch.as_tensor(image).float()
    missing = torch.as_tensor(missing).bool().expand_as(image)
    out = torch.zeros_like(image)
    for c in range(image.shape[0]):
        valid = ~missing[c]
        if not valid.any():
            continue
        if meta.modality == "ct":
            low, high = (float(v) for v in meta.window)
        else:
            low, high = (float(v) for v in np.percentile(image[c][valid].numpy(), MR_PERCENTILES))
        scale = mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        out[c] = torch.where(valid, torch.as_tensor(scale(image[c])).float(), 0.0)
    return out


def preprocessing_config(
    meta: SegmentationMeta, keys: Sequence[str] = ("image",), label_key: str | None = None
) -> list[dict[str, Any]]:
    """The same preprocessing as MONAI bundle config entries (``{"_target_": "Orientationd", ...}``)."""
    return [{"_target_": name, **kwargs} for name, kwargs in preprocessing_spec(meta, keys, label_key)]
