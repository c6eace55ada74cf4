"""One input through the backbone: normalised as the backbone was trained, patch tokens and CLS attention out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from foundation.errors import DataError
from foundation.visualize.attention import record_cls_attention
from foundation.visualize.inputs import VisualInput


@dataclass(frozen=True)
class ModelInput:
    """What the backbone is given (``normalised``) and the same pixels de-normalised for display."""

    normalised: torch.Tensor  # C x *spatial
    shown: torch.Tensor  # C x *spatial, normalised * std + mean


@dataclass(frozen=True)
class TokenMaps:
    """One input's tokens: ``patch`` ``(N, E)`` on ``grid``; ``attention`` ``(heads, N)``: the last block's CLS
    attention on each patch; ``register_share``: its mean share on the register tokens (0 without any)."""

    patch: torch.Tensor
    grid: tuple[int, ...]
    attention: torch.Tensor | None
    registers: int
    register_share: float


def prepare(
    item: VisualInput,
    *,
    channels: int,
    patch: int,
    spatial_dims: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> ModelInput:
    """Check ``item`` against the backbone, centre-crop it to whole patches and normalise it with the backbone's
    statistics (``mean``/``std``; else the domain's, from ``item``).

    Raises:
        DataError: wrong channel count, wrong dimensionality, or a side shorter than one patch; names the input.
    """
    pixels = item.pixels.float()
    if pixels.ndim != 1 + spatial_dims:
        raise DataError(
            f"{item.title}: a {pixels.ndim - 1}D input for a {spatial_dims}D backbone (shape {tuple(pixels.shape)})"
        )
    if pixels.shape[0] != channels:
        raise DataError(
            f"{item.title}: has {pixels.shape[0]} channels, the backbone takes {channels}; pick the bands or "
            "backbone that match (e.g. --bands for rasters)"
        )
    sides = tuple(int(s) for s in pixels.shape[1:])
    if min(sides) < patch:
        raise DataError(
            f"{item.title}: size {sides} is smaller than one {patch}-pixel patch; nothing to show"
        )
    slices = [slice(None)]
    for s in sides:  # centre crop to whole patches
        keep = s - s % patch
        slices.append(slice((s - keep) // 2, (s - keep) // 2 + keep))
    pixels = pixels[tuple(slices)]
    m = torch.tensor(list(mean) if mean else list(item.mean), dtype=torch.float32)
    s = torch.tensor(list(std) if std else list(item.std), dtype=torch.float32)
    if m.numel() != channels or s.numel() != channels:
        raise DataError(f"{item.title}: {m.numel()} mean / {s.numel()} std values for {channels} channels")
    shape = (-1,) + (1,) * spatial_dims
    normalised = (pixels - m.view(shape)) / s.view(shape)
    return ModelInput(normalised, normalised * s.view(shape) + m.view(shape))


@torch.inference_mode()
def token_maps(backbone: torch.nn.Module, x: torch.Tensor, device: torch.device) -> TokenMaps:
    """Patch tokens after the final norm and the last block's CLS attention of one normalised input."""
    registers = int(getattr(backbone, "num_reg_tokens", 0) or 0)
    has_cls = bool(getattr(backbone, "has_class_token", False))
    batch = x[None].to(device)
    if has_cls:
        with record_cls_attention(backbone) as rows:
            out = backbone.forward_dict(batch)
        row = rows[-1][0].float()  # heads x all tokens
    else:
        out, row = backbone.forward_dict(batch), None
    patch = out["patch"][0].float().cpu()
    grid = tuple(s // backbone.patch_size for s in x.shape[1:])
    attention, share = None, 0.0
    if row is not None:
        prefix = int(backbone.num_prefix_tokens)
        attention = row[:, prefix:]
        share = float(row[:, 1 : 1 + registers].sum(-1).mean()) if registers else 0.0
    return TokenMaps(patch, grid, attention, registers, share)
