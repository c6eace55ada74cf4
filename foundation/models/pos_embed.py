"""Fixed sin-cos position embeddings (MAE decoder) and resampling of learned ones to other grids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Separable sin-cos embedding on a 2D or 3D grid, ``(prod(grid), embed_dim)`` float32.

    Each axis gets an equal, even share of the channels (the remainder is zero-padded), as in MAE's 2D
    version; 3D simply adds the depth axis.
    """
    n = len(grid_size)
    per_axis = (embed_dim // n) // 2 * 2
    axes = torch.meshgrid(*[torch.arange(s) for s in grid_size], indexing="ij")
    parts = [_sincos_1d(per_axis, a.reshape(-1)) for a in axes]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < embed_dim:
        emb = F.pad(emb, (0, embed_dim - emb.shape[1]))
    return emb.float()


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]
) -> torch.Tensor:
    """Interpolate patch position embeddings ``(1, prod(old_grid), E)`` to ``new_grid`` (2D bicubic, 3D trilinear)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    e = pos_embed.shape[-1]
    if math.prod(old_grid) != pos_embed.shape[1]:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens, grid {old_grid} needs {math.prod(old_grid)}"
        )
    if len(old_grid) == 2:  # exactly timm's resampling (bicubic, antialiased), so exports match timm
        return resample_abs_pos_embed(
            pos_embed, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0
        )
    grid = pos_embed.reshape(1, *old_grid, e).movedim(-1, 1).float()
    out = F.interpolate(grid, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return out.movedim(1, -1).reshape(1, -1, e).to(pos_embed.dtype)
