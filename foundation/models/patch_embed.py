"""Patch embedding for volumes; 2D uses timm's ``PatchEmbed``."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed3d(nn.Module):
    """Cubic (or cuboid) patches of a ``B x C x D x H x W`` volume to ``B x D' x H' x W' x E`` tokens.

    The output layout matches timm's 2D ``PatchEmbed(output_fmt="NHWC")`` with one more spatial axis.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size,) * 3
        self.img_size = (img_size,) * 3
        self.grid_size = tuple(s // patch_size for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)
