"""Stain augmentation in HED space (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001; Tellez et al.,
arXiv 1902.06543): colour deconvolution into haematoxylin, eosin and DAB densities, a random scale and shift
per stain, and back to RGB. It mimics lab-to-lab staining differences, which plain colour jitter does not.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import ImageOnlyTransform

# Optical-density vectors of haematoxylin, eosin and DAB (rows), normalised to unit length.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# cv2.transform computes out[i] = sum_j m[i, j] * in[j]: the transposed matrices, as float32.
_RGB_FROM_HED_T = np.ascontiguousarray(RGB_FROM_HED.T, dtype=np.float32)
_HED_FROM_RGB_T = np.ascontiguousarray(HED_FROM_RGB.T, dtype=np.float32)
# -ln((I + 1) / 256) for every uint8 value: +1 keeps black finite, and white (255) maps to zero density.
_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1) / 256)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> float32 stain densities (H, E, D)."""
    return cv2.transform(_OD_LUT[rgb], _HED_FROM_RGB_T)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Stain densities -> ``H x W x 3`` uint8 RGB (the inverse of :func:`rgb_to_hed` up to rounding)."""
    od = cv2.transform(np.ascontiguousarray(hed, dtype=np.float32), _RGB_FROM_HED_T)
    rgb = cv2.exp(np.negative(od, out=od))
    rgb *= 256
    rgb -= 0.5  # -1 from the +1 above, +0.5 to round
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


def _check_ranges(scale: float, shift: float) -> tuple[float, float]:
    if not (0 <= scale < 1 and shift >= 0):
        raise ValueError(f"HEDJitter(scale={scale!r}, shift={shift!r}): need 0 <= scale < 1 and shift >= 0")
    return scale, shift


class HEDJitter(ImageOnlyTransform):
    """Scale each stain density by U(1 - scale, 1 + scale) and shift it by U(-shift, shift).

    Args:
        scale: half-width of the multiplicative range (stain intensity).
        shift: half-width of the additive range, in optical-density units (background tint).
        p: probability of applying the transform.
    """

    def __init__(self, scale: float = 0.05, shift: float = 0.05, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.scale, self.shift = _check_ranges(scale, shift)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator  # seeded by Compose.set_random_seed: reproducible per sample
        return {
            "alpha": rng.uniform(1 - self.scale, 1 + self.scale, 3).astype(np.float32),
            "beta": rng.uniform(-self.shift, self.shift, 3).astype(np.float32),
        }

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"HEDJitter needs H x W x 3 uint8 RGB, got {img.dtype} {img.shape}")
        return hed_to_rgb(rgb_to_hed(img) * alpha + beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "shift")


class HEDJitterOnDevice:
    """:class:`HEDJitter` as a per-tile op of the device views (``foundation.data.device_views.TileOp``): the
    worker draws the six numbers once per tile; the training device applies them to every crop of that tile,
    batched. RGB -> HED -> jitter -> RGB collapses to one affine map of optical densities per sample.
    """

    n_params = 6

    def __init__(self, scale: float = 0.05, shift: float = 0.05) -> None:
        self.scale, self.shift = _check_ranges(scale, shift)

    def __repr__(self) -> str:
        return f"HEDJitterOnDevice(scale={self.scale}, shift={self.shift})"

    def draw(self, u: np.ndarray) -> list[float]:
        """``(alpha_H, alpha_E, alpha_D, beta_H, beta_E, beta_D)`` of one tile from six uniforms in [0, 1)."""
        v = 2 * np.asarray(u[:6], dtype=np.float64) - 1
        return [*(1 + self.scale * v[:3]).tolist(), *(self.shift * v[3:]).tolist()]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, 3, H, W)`` RGB in [0, 1] (uint8 values / 255), ``params`` ``(B, 6)`` -> jittered RGB."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HEDJitterOnDevice needs (B, 3, H, W) RGB, got {tuple(x.shape)}")
        hed_from_rgb = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
        rgb_from_hed = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
        alpha, beta = params[:, :3].to(x.dtype), params[:, 3:].to(x.dtype)
        # od' = (od @ M1 * alpha + beta) @ M2 = od @ (M1 diag(alpha) M2) + beta @ M2
        affine = hed_from_rgb[None] * alpha[:, None, :] @ rgb_from_hed  # (B, 3, 3)
        offset = beta @ rgb_from_hed  # (B, 3)
        od = x.mul(255 / 256).add_(1 / 256).log_().neg_()  # -ln((I + 1) / 256), I = 255 x
        od = torch.einsum("bchw,bcd->bdhw", od, affine).add_(offset[:, :, None, None])
        return od.neg_().exp_().mul_(256 / 255).sub_(1 / 255).clamp_(0, 1)
