"""Views made on the training device, batched: the loader workers only read tiles.

Data-loader workers are the bottleneck of a tile stream that reads gigapixel slides: each worker should read
tiles, not spend most of its time cutting, colour-jittering, blurring and converting ten crops per tile. Here a
worker returns the uint8 tile plus, per crop, a small vector of random parameters drawn from the sample's
generator (crop box, flip/rotation, per-tile stain jitter, colour jitter, grayscale, blur, solarize). The loader
ships one uint8 tile instead of ten float crops, and :class:`DeviceStage` cuts and resizes all crops of the
batch at once (``torchvision.ops.roi_align``: bilinear, averaging several samples per output pixel when a crop
shrinks), applies the 8 flips/rotations, the per-tile ops, kornia's colour ops (torchvision's definitions) and
normalisation. Every random choice is still a pure function of the sample index, so resume and DDP stay exact.

Float ops on the CPU cost several times what OpenCV's uint8 ops cost, so CPU runs keep the all-in-worker
views (:mod:`foundation.data.views`); ``data.augment_on`` picks (:func:`augment_on_device`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import gaussian_blur2d
from torch import Tensor
from torchvision.ops import roi_align

from foundation.config import CropsConfig, DataConfig
from foundation.data.views import BLUR_P, BLUR_SIGMA, GRAY_P, JITTER, JITTER_P, SOLARIZE_P, blur_sigma

# DINOv2 blurs with torchvision's GaussianBlur(kernel_size=9, sigma=(0.1, 2.0)).
BLUR_KERNEL = 9
# Layout of the photometric part of a crop's parameter vector.
_B, _C, _S, _H, _ORDER, _GRAY, _SIGMA, _SOLARIZE = 0, 1, 2, 3, slice(4, 8), 8, 9, 10
N_PHOTOMETRIC = 11
# Uniforms drawn per crop: 22 for the crop box, 1 for flips/rotations, 13 for the photometric parameters.
N_UNIFORMS = 23 + 13
RATIO = (3 / 4, 4 / 3)
# Geometric part of a crop's parameter vector: top, left, height, width (tile pixels), d4 (0-7).
N_GEOMETRIC = 5
_JITTER_OPS = (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
    lambda x, turns: adjust_hue(x, turns * (2 * torch.pi)),  # torchvision's hue factor is in turns
)
_NEUTRAL = (1.0, 1.0, 1.0, 0.0)


def augment_on_device(data: DataConfig) -> bool:
    """``data.augment_on``: "device", "workers", or "auto" = the device when CUDA is available. The engine makes
    "auto" concrete from the device training runs on first (``resolve_augment_on``); float ops on ten crops per
    tile cost several times more on the CPU than OpenCV's uint8 ops in the workers."""
    if data.augment_on == "auto":
        return torch.cuda.is_available()
    return data.augment_on == "device"


class TileOp(Protocol):
    """A per-tile device op (e.g. stain jitter): drawn once per sample, applied to every crop of it."""

    n_params: int

    def draw(self, u: np.ndarray) -> list[float]:
        """The ``n_params`` parameters of one sample from as many uniforms in [0, 1)."""
        ...

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)`` float in [0, 1], ``params`` ``(B, n_params)`` -> ``x`` transformed."""
        ...


@dataclass(frozen=True)
class Photometric:
    """The photometric recipe of one crop set (DINOv2: global 1, global 2, locals differ in blur/solarize).

    Attributes:
        jitter: (brightness, contrast, saturation, hue) amplitudes as torchvision's ColorJitter, or None.
        jitter_p: probability of the colour jitter (its four ops in a random order, as torchvision).
        gray_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur with sigma ~ U(blur_sigma).
        blur_sigma: its range in pixels (DINOv2's 0.1-2.0 at 224 px, scaled to the crop: ``views.blur_sigma``).
        solarize_p: probability of solarizing (inverting values >= 0.5).
    """

    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = JITTER_P
    gray_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = BLUR_SIGMA

    def draw(self, u: np.ndarray) -> list[float]:
        """The 11 parameters of one crop from ``N_UNIFORMS`` uniforms: jitter factors (neutral when not
        jittered), op order, grayscale, blur sigma (0 = none), solarize."""
        factors = list(_NEUTRAL)
        if self.jitter is not None and u[0] < self.jitter_p:
            b, c, s, h = self.jitter
            factors = [
                max(0.0, 1 - b) + (1 + b - max(0.0, 1 - b)) * u[1],
                max(0.0, 1 - c) + (1 + c - max(0.0, 1 - c)) * u[2],
                max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * u[3],
                -h + 2 * h * u[4],
            ]
        order = np.argsort(u[5:9]).tolist()  # a uniformly random permutation
        low, high = self.blur_sigma
        sigma = low + (high - low) * u[11] if u[10] < self.blur_p else 0.0
        return [*factors, *order, float(u[9] < self.gray_p), sigma, float(u[12] < self.solarize_p)]


def apply_photometric(x: Tensor, params: Tensor) -> Tensor:
    """Apply :meth:`Photometric.draw` parameters to a batch ``(B, 3, H, W)`` in [0, 1], sample by sample.

    Each sample's four jitter ops run in its own order: at step k every sample is given its k-th op, so the
    whole batch costs four op-passes, not four per distinct order. ``x`` is updated in place where it can be.
    """
    factors, order = params[:, :4], params[:, _ORDER].long()
    jittered = (factors != torch.tensor(_NEUTRAL, device=x.device)).any(dim=1)
    for step in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = torch.nonzero(jittered & (order[:, step] == op_index)).flatten()
            if rows.numel():
                x[rows] = op(x[rows], factors[rows, op_index]).clamp_(0, 1)
    gray = params[:, _GRAY] > 0
    if gray.any():
        x = torch.where(gray[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
    rows = torch.nonzero(params[:, _SIGMA] > 0).flatten()
    if rows.numel():
        sigma = params[rows, _SIGMA, None].expand(-1, 2)
        x[rows] = gaussian_blur2d(x[rows], BLUR_KERNEL, sigma, border_type="reflect")
    solarize = params[:, _SOLARIZE] > 0
    if solarize.any():
        x = torch.where(solarize[:, None, None, None] & (x >= 0.5), 1.0 - x, x)
    return x


class DeviceStage:
    """The batch half of the views: uint8 tiles ``(B, H, W, C)`` + per-crop parameters -> normalised crops.

    Called by the engine on each batch after it is moved to the device. ``batch["tile"]`` is consumed; each key
    in ``sizes`` holds the ``(R, P)`` parameters of its crops (crop-major: row ``r`` is a crop of sample
    ``r % B``, as :func:`~foundation.data.stream.collate_views` stacks them) and is replaced by the crops
    ``(R, C, size, size)``.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        tile_ops: Sequence[TileOp] = (),
        photometric: bool = True,
    ) -> None:
        self.sizes = dict(sizes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.tile_ops = tuple(tile_ops)
        self.photometric = photometric

    def crops(self, tiles: Tensor, params: Tensor, size: int) -> Tensor:
        """``tiles`` ``(B, H, W, C)`` uint8 and ``params`` ``(R, P)`` -> ``(R, C, size, size)`` float32."""
        if tiles.dtype != torch.uint8 or tiles.ndim != 4:
            raise ValueError(
                f"device views expect (B, H, W, C) uint8 tiles, got {tiles.dtype} {tuple(tiles.shape)}"
            )
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        params = params.to(x.device, torch.float32)
        rows = torch.arange(params.shape[0], device=x.device) % x.shape[0]
        top, left, h, w = params[:, 0], params[:, 1], params[:, 2], params[:, 3]
        boxes = torch.stack([rows.to(x.dtype), left, top, left + w, top + h], dim=1)
        x = roi_align(x, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        x = apply_d4(x, params[:, 4].long())
        offset = N_GEOMETRIC
        for op in self.tile_ops:
            x = op.apply(x, params[:, offset : offset + op.n_params])
            offset += op.n_params
        if self.photometric:
            x = apply_photometric(x, params[:, offset : offset + N_PHOTOMETRIC])
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tiles = batch.pop("tile")
        for key, size in self.sizes.items():
            if batch.get(key) is not None:
                batch[key] = self.crops(tiles, batch[key], size)
        return batch


def apply_d4(x: Tensor, d4: Tensor) -> Tensor:
    """One of the 8 flips/rotations per sample: ``d4 % 4`` counter-clockwise quarter turns (``np.rot90``'s
    sense), mirrored left-right first when ``d4 >= 4``. Crops must be square."""
    out = x.clone()
    for variant in d4.unique().tolist():
        rows = torch.nonzero(d4 == variant).flatten()
        y = x[rows].flip(-1) if variant >= 4 else x[rows]
        out[rows] = torch.rot90(y, variant % 4, dims=(-2, -1))
    return out


def random_resized_box(
    u: np.ndarray, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = RATIO
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, torchvision's algorithm (10 tries at a random area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else the largest centred box), driven by
    ``2 * 10 + 2`` uniforms instead of a global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[2 * attempt + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropRecipe:
    """Random resized crop + flips of one crop set, drawn in the worker as :data:`N_GEOMETRIC` numbers.

    Args:
        scale: area fraction range of the crop.
        rot90: all 8 flips/rotations; otherwise horizontal flips only.
    """

    def __init__(self, scale: Sequence[float], rot90: bool) -> None:
        self.scale, self.rot90 = tuple(scale), rot90

    def draw(self, height: int, width: int, u: np.ndarray) -> list[float]:
        top, left, h, w = random_resized_box(u, height, width, self.scale)
        d4 = int(u[22] * 8) if self.rot90 else 4 * int(u[22] < 0.5)  # 4 = mirrored, no turn
        return [top, left, h, w, d4]


def _draw(
    tile_ops: Sequence[TileOp], generator: torch.Generator, crops: int
) -> tuple[list[float], np.ndarray]:
    """The per-tile op parameters and ``crops`` rows of :data:`N_UNIFORMS` uniforms (crop box, flips,
    photometric), from one RNG call: each call costs as much as the arithmetic on its numbers."""
    n_tile = sum(op.n_params for op in tile_ops)
    u = torch.rand(n_tile + crops * N_UNIFORMS, generator=generator, dtype=torch.float64).numpy()
    tile, offset = [], 0
    for op in tile_ops:
        tile += op.draw(u[offset : offset + op.n_params])
        offset += op.n_params
    return tile, u[n_tile:].reshape(crops, N_UNIFORMS)


def _tile(image: np.ndarray) -> Tensor:
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"device views expect H x W x C uint8 tiles, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image))


class DeviceMultiCropViews:
    """DINOv2 multi-crop (:class:`~foundation.data.views.MultiCropViews`'s recipe) made on the device.
    ``__call__`` returns the uint8 tile and each crop's parameters; :attr:`device_transform` makes the crops.

    Args:
        crops: sizes, counts and scale ranges.
        mean, std: per-channel statistics of [0, 1] pixels.
        color: colour jitter (0.8) and grayscale (0.2).
        solarize: solarize the second global crop with p=0.2.
        rot90: all 8 flips/rotations instead of horizontal flips (slides have no "up").
        color_strength: scales the jitter amplitudes.
        tile_ops: per-tile ops (stain jitter), drawn once per sample and applied to each of its crops.
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
        tile_ops: Sequence[TileOp] = (),
    ) -> None:
        self.n_local = crops.n_local
        self.tile_ops = tuple(tile_ops)
        self.global_crop = CropRecipe(crops.global_scale, rot90)
        self.local_crop = CropRecipe(crops.local_scale, rot90)
        jitter = tuple(a * color_strength for a in JITTER) if color else None
        gray = GRAY_P if color else 0.0
        g_blur = blur_sigma(crops.global_size, "global")
        self.global1 = Photometric(jitter, gray_p=gray, blur_p=BLUR_P["global1"], blur_sigma=g_blur)
        second_solarize = SOLARIZE_P if solarize else 0.0
        self.global2 = Photometric(
            jitter, gray_p=gray, blur_p=BLUR_P["global2"], solarize_p=second_solarize, blur_sigma=g_blur
        )
        local_blur = blur_sigma(crops.local_size, "local")
        self.local = Photometric(jitter, gray_p=gray, blur_p=BLUR_P["local"], blur_sigma=local_blur)
        sizes = {"global_crops": crops.global_size, "local_crops": crops.local_size}
        self.device_transform = DeviceStage(sizes, mean, std, tile_ops=self.tile_ops)

    def __call__(self, image: np.ndarray, generator: torch.Generator) -> dict[str, Any]:
        tile, u = _draw(self.tile_ops, generator, 2 + self.n_local)
        recipes = [(self.global_crop, self.global1), (self.global_crop, self.global2)]
        recipes += [(self.local_crop, self.local)] * self.n_local
        h, w = image.shape[:2]
        params = [
            torch.tensor(crop.draw(h, w, row) + tile + photometric.draw(row[23:]), dtype=torch.float32)
            for (crop, photometric), row in zip(recipes, u, strict=True)
        ]
        return {"tile": _tile(image), "global_crops": params[:2], "local_crops": params[2:]}


class DeviceMAEView:
    """MAE's view (RandomResizedCrop 0.2-1 + flips), per-tile ops and normalisation made on the device
    (:attr:`device_transform`); the worker returns the tile and the crop's parameters."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: Sequence[float] = (0.2, 1.0),
        rot90: bool = False,
        tile_ops: Sequence[TileOp] = (),
    ) -> None:
        self.crop = CropRecipe(scale, rot90)
        self.tile_ops = tuple(tile_ops)
        self.device_transform = DeviceStage(
            {"image": size}, mean, std, tile_ops=self.tile_ops, photometric=False
        )

    def __call__(self, image: np.ndarray, generator: torch.Generator) -> dict[str, Any]:
        tile, u = _draw(self.tile_ops, generator, 1)
        params = self.crop.draw(image.shape[0], image.shape[1], u[0]) + tile
        return {"tile": _tile(image), "image": torch.tensor(params, dtype=torch.float32)}
