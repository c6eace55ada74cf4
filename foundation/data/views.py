"""2D views with albumentations: DINOv2 multi-crop (arXiv 2304.07193) and the MAE crop (arXiv 2111.06377).

Domains pick the pieces that suit their images (rotations for slides, no colour ops on multispectral
bands) and may prepend their own transforms (stain jitter). Randomness comes from the caller's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from foundation.config import CropsConfig
from foundation.data.seeding import draw_seed

# DINOv2's photometric recipe (arXiv 2304.07193, after BYOL), shared with the device views.
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue amplitudes
JITTER_P = 0.8
GRAY_P = 0.2
BLUR_SIGMA = (0.1, 2.0)  # pixels of DINOv2's 224 px global and 96 px local crops
BLUR_P = {"global1": 1.0, "global2": 0.1, "local": 0.5}
BLUR_REFERENCE = {"global": 224, "local": 96}
SOLARIZE_P = 0.2  # second global crop only


def blur_sigma(size: int, crop: str) -> tuple[float, float]:
    """DINOv2's blur range for a ``crop`` ("global" or "local") of ``size`` px: the same blur relative to the crop's
    width, never more than DINOv2's. Its 2 px at 224 px is 9 px at 32 px: it wipes out the strokes of a digit and
    taught a 32 px model to drop the detail a linear probe reads (digits, 800 steps: linear top-1 0.833 with 2 px,
    0.858 scaled)."""
    scale = min(1.0, size / BLUR_REFERENCE[crop])
    return BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC numpy -> CHW float32 tensor."""
    if image.ndim == 2:
        image = image[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


def _normalize(mean: Sequence[float], std: Sequence[float], max_pixel_value: float) -> A.Normalize:
    return A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=max_pixel_value, p=1.0)


def _run(pipeline: A.Compose, image: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    pipeline.set_random_seed(draw_seed(generator))
    return to_chw_tensor(pipeline(image=image)["image"])


class MultiCropViews:
    """Two global crops and ``n_local`` local crops with DINOv2's photometric recipe.

    Args:
        crops: sizes, counts and scale ranges.
        mean, std: per-channel statistics in pixel units divided by ``max_pixel_value``.
        color: colour jitter (0.8) and grayscale (0.2); only for 3-channel RGB.
        solarize: solarize the second global crop with p=0.2 (off for pathology).
        rot90: add vertical flips and 90-degree rotations (slides and rasters have no "up").
        color_strength: scales the jitter amplitudes (pathology uses weaker jitter); 0 turns jitter and grayscale
            off, as ``color=False`` does.
        pre: domain transforms applied once to the whole sample before cropping (e.g. HED stain jitter).
        max_pixel_value: 255 for uint8 images, 1.0 for float images already in [0, 1].
    """

    def __init__(
        self,
        crops: CropsConfig,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        color: bool = True,
        solarize: bool = True,
        rot90: bool = False,
        color_strength: float = 1.0,
        pre: Sequence[A.BasicTransform] = (),
        max_pixel_value: float = 255.0,
    ) -> None:
        self.n_local = crops.n_local
        self.pre = A.Compose(list(pre)) if pre else None

        def geometric(size: int, scale: Sequence[float]) -> list[A.BasicTransform]:
            ops: list[A.BasicTransform] = [
                A.RandomResizedCrop(size=(size, size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC),
                # all 8 flips/rotations in one copy (three separate ops cost three copies per crop)
                A.D4(p=1.0) if rot90 else A.HorizontalFlip(p=0.5),
            ]
            return ops

        photometric: list[A.BasicTransform] = []
        if color and color_strength > 0:
            s = color_strength
            photometric = [
                A.ColorJitter(*(a * s for a in JITTER), p=JITTER_P),
                A.ToGray(p=GRAY_P),
            ]

        def blur(p: float, size: int, crop: str) -> A.GaussianBlur:
            return A.GaussianBlur(sigma_limit=blur_sigma(size, crop), p=p)

        norm = _normalize(mean, std, max_pixel_value)
        g_size, l_size = crops.global_size, crops.local_size
        self.global1 = A.Compose(
            geometric(g_size, crops.global_scale)
            + photometric
            + [blur(BLUR_P["global1"], g_size, "global"), norm]
        )
        second = [blur(BLUR_P["global2"], g_size, "global")]
        second += [A.Solarize(threshold_range=(0.5, 0.5), p=SOLARIZE_P)] if solarize else []
        self.global2 = A.Compose(geometric(g_size, crops.global_scale) + photometric + second + [norm])
        self.local = A.Compose(
            geometric(l_size, crops.local_scale)
            + photometric
            + [blur(BLUR_P["local"], l_size, "local"), norm]
        )

    def __call__(self, image: np.ndarray, generator: torch.Generator) -> dict[str, Any]:
        if self.pre is not None:
            self.pre.set_random_seed(draw_seed(generator))
            image = self.pre(image=image)["image"]
        # Each pipeline is seeded once per sample and the local one then draws its n crops in sequence:
        # deterministic per sample, and 3 instead of 2 + n reseedings (each costs as much as a small crop).
        local = []
        if self.n_local:
            self.local.set_random_seed(draw_seed(generator))
            local = [to_chw_tensor(self.local(image=image)["image"]) for _ in range(self.n_local)]
        return {
            "global_crops": [_run(self.global1, image, generator), _run(self.global2, image, generator)],
            "local_crops": local,
        }


class MAEView:
    """One RandomResizedCrop (scale 0.2-1) + flips view, as in MAE's pretraining recipe."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: Sequence[float] = (0.2, 1.0),
        rot90: bool = False,
        pre: Sequence[A.BasicTransform] = (),
        max_pixel_value: float = 255.0,
    ) -> None:
        ops: list[A.BasicTransform] = list(pre) + [
            A.RandomResizedCrop(size=(size, size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC),
            A.D4(p=1.0) if rot90 else A.HorizontalFlip(p=0.5),
        ]
        self.pipeline = A.Compose(ops + [_normalize(mean, std, max_pixel_value)])

    def __call__(self, image: np.ndarray, generator: torch.Generator) -> dict[str, Any]:
        return {"image": _run(self.pipeline, image, generator)}


class EvalView:
    """Deterministic resize (shorter side) + centre crop + normalise, for kNN / linear probe / embed."""

    def __init__(
        self, size: int, mean: Sequence[float], std: Sequence[float], max_pixel_value: float = 255.0
    ):
        self.pipeline = A.Compose(
            [
                A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
                A.CenterCrop(height=size, width=size),
                _normalize(mean, std, max_pixel_value),
            ]
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return to_chw_tensor(self.pipeline(image=image)["image"])


class ImageViews:
    """Adapts an array view pipeline (``MultiCropViews``, ``MAEView``) to the Domain seam: it reads the
    sample's ``image`` and returns the views."""

    def __init__(self, views: Any) -> None:
        self.views = views
        # views that finish on the training device (``device_views``) hand the engine their batch stage
        self.device_transform = getattr(views, "device_transform", None)

    def __call__(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        return self.views(sample["image"], generator)
