"""Patch masking for masked-image SSL objectives.

* Block-wise masks for iBOT as used in DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193),
  following BEiT: random rectangles on the patch grid until the requested number of patches is masked.
* Per-sample random masking for MAE (He et al. 2021, https://arxiv.org/abs/2111.06377).

All randomness comes from an explicit ``torch.Generator`` so masks are reproducible and independent of
global RNG state (data-loader workers, resumed runs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MAX_TRIES_PER_BLOCK = 10


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Integer uniform in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _check_grid(grid_size: tuple[int, int]) -> tuple[int, int]:
    if len(grid_size) != 2 or min(grid_size) < 1:
        raise ValueError(f"grid_size must be two positive ints (H, W), got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


class BlockMaskGenerator:
    """BEiT/iBOT block-wise masks: contiguous rectangles hide whole object parts, unlike i.i.d. patches."""

    def __init__(
        self,
        grid_size: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        """Configure block sizes.

        Args:
            grid_size: Patch grid (H, W).
            min_num_patches: Smallest block area.
            max_num_patches: Largest block area; defaults to H * W.
            min_aspect: Smallest block aspect ratio h / w.
            max_aspect: Largest aspect ratio; defaults to 1 / min_aspect.
        """
        self.height, self.width = _check_grid(grid_size)
        num_patches = self.height * self.width
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches!r}")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = num_patches if max_num_patches is None else int(max_num_patches)
        if self.max_num_patches < self.min_num_patches:
            raise ValueError(
                f"max_num_patches must be >= min_num_patches={min_num_patches!r}, got {max_num_patches!r}"
            )
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not max_aspect >= min_aspect:
            raise ValueError(f"max_aspect must be >= min_aspect={min_aspect!r}, got {max_aspect!r}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: Tensor, remaining: int, generator: torch.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..remaining new patches. Returns how many."""
        high = min(remaining, self.max_num_patches)
        low = min(self.min_num_patches, high)  # lets the last blocks fill a small remainder exactly
        for _ in range(_MAX_TRIES_PER_BLOCK):
            area = _uniform(low, high, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))  # log-uniform h / w
            h = max(1, round(math.sqrt(area * aspect)))
            w = max(1, round(math.sqrt(area / aspect)))
            if h > self.height or w > self.width:
                continue
            top = _randint(0, self.height - h, generator)
            left = _randint(0, self.width - w, generator)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block.fill_(True)
                return new
        return 0

    def __call__(self, num_masking_patches: int, generator: torch.Generator) -> Tensor:
        """Sample a (H, W) bool mask with num_masking_patches True, or fewer if blocks stop fitting.

        Args:
            num_masking_patches: Target number of masked patches, in [0, H * W].
            generator: Source of all randomness.

        Returns:
            (H, W) bool tensor, True = masked.
        """
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.height * self.width}], got {num_masking_patches!r}"
            )
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, num_masking_patches - count, generator)
            if added == 0:
                break  # no progress after 10 tries
            count += added
        return mask


def random_block_mask(grid_size: tuple[int, int], mask_ratio: float, generator: torch.Generator) -> Tensor:
    """Block mask covering round(mask_ratio * H * W) patches (iBOT), with default block shapes.

    Args:
        grid_size: Patch grid (H, W).
        mask_ratio: Fraction of patches to mask, in [0, 1].
        generator: Source of all randomness.

    Returns:
        (H, W) bool tensor, True = masked.
    """
    height, width = _check_grid(grid_size)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
    return BlockMaskGenerator((height, width))(round(mask_ratio * height * width), generator)


def random_masking_indices(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MAE per-sample random masking: argsort of uniform noise gives an independent shuffle per sample.

    Args:
        batch: Batch size B.
        num_tokens: Tokens per sample N.
        mask_ratio: Fraction masked, in the open interval (0, 1) (``ssl.mask_ratio``).
        generator: Source of randomness, or None for the global RNG.
        device: Device of the returned tensors.

    Returns:
        keep_idx (B, n_keep) indices of visible tokens, mask (B, N) bool with True = masked (in the
        original order), restore_idx (B, N) such that gathering [visible, mask tokens] with it restores
        the original order. n_keep = int(N * (1 - mask_ratio)).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"ssl.mask_ratio must be in the open interval (0, 1), got {mask_ratio!r}")
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"batch and num_tokens must be >= 1, got {batch!r} and {num_tokens!r}")
    # The tiny slack stops float error dropping a token, e.g. 10 * (1 - 0.9) = 0.9999999999999998.
    n_keep = int(num_tokens * (1.0 - mask_ratio) + 1e-6)
    if n_keep < 1:
        raise ValueError(f"ssl.mask_ratio={mask_ratio!r} leaves no visible token out of {num_tokens!r}")
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_tokens, generator=generator, device=noise_device).to(device)
    shuffle_idx = torch.argsort(noise, dim=1)  # ascending: the first n_keep are kept
    restore_idx = torch.argsort(shuffle_idx, dim=1)
    keep_idx = shuffle_idx[:, :n_keep]
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=noise.device)
    mask[:, :n_keep] = False
    mask = torch.gather(mask, 1, restore_idx)  # back to the original token order
    return keep_idx, mask, restore_idx
