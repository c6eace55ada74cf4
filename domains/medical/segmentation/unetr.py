"""A UNETR-style decoder (arXiv 2103.10504) built from MONAI blocks, for our 3D ViT of any depth.

MONAI's ``UNETR`` hard-codes its own 12-block ViT, patch 16 and skips from blocks 3/6/9/12. Here the encoder is
our backbone: skips come from ``L = log2(patch)`` evenly spaced blocks (depth 12, patch 16 -> blocks 3/6/9/12;
depth 4 -> 1/2/3/4), CLS and register tokens are dropped by ``get_intermediate_layers``, and the tokens are
reshaped to the 3D patch grid. Skip ``j`` (shallow to deep, ``j < L``) is upsampled to ``1 / 2^j`` of the input;
the last block's tokens start the decoder at ``1 / patch``; a conv block on the image is the full-resolution skip.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from foundation.errors import ConfigError


def decoder_levels(patch_size: int) -> int:
    """``log2(patch_size)``: one 2x upsampling per level.

    Raises:
        ConfigError: the patch size is not a power of two >= 2.
    """
    levels = int(round(math.log2(patch_size))) if patch_size >= 2 else 0
    if levels < 1 or 2**levels != patch_size:
        raise ConfigError(
            f"the UNETR decoder needs a backbone patch size that is a power of two (8, 16, ...), got {patch_size}"
        )
    return levels


def skip_blocks(depth: int, levels: int) -> list[int]:
    """0-based indices of ``levels`` evenly spaced blocks ending with the last: ``ceil(depth * k / levels) - 1``."""
    return [-(-depth * k // levels) - 1 for k in range(1, levels + 1)]


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Patch tokens ``(B, N, E)`` to a feature volume ``(B, E, *grid)``."""
    b, n, e = tokens.shape
    return tokens.transpose(1, 2).reshape(b, e, *grid)


class UNETRDecoder(nn.Module):
    """The convolutional half of UNETR; ``forward(image, features, grid)`` with ``features`` from shallow to deep.

    Args:
        in_chans: image channels (the full-resolution conv skip).
        embed_dim: backbone token width.
        patch_size: backbone patch size (power of two); sets the number of levels.
        out_channels: classes, background included.
        feature_size: channels at full resolution; level ``j`` has ``feature_size * 2^j``.
        norm_name: MONAI norm of the conv blocks (``instance``, ``batch``, ...).
        res_block: residual conv blocks, as in UNETR.
        dropout: dropout before the 1x1x1 output conv.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        out_channels: int,
        feature_size: int = 16,
        norm_name: str = "instance",
        res_block: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.levels = levels = decoder_levels(patch_size)
        fs, conv = feature_size, dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder0 = UnetrBasicBlock(in_channels=in_chans, out_channels=fs, stride=1, **conv)
        # skip j in 1..L-1: token grid (1/2^L) up to 1/2^j, i.e. L - j transposed convs
        self.encoders = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=embed_dim,
                out_channels=fs * 2**j,
                num_layer=levels - j - 1,
                stride=1,
                upsample_kernel_size=2,
                **conv,
            )
            for j in range(1, levels)
        )
        # decoder j in L-1..0: from 1/2^(j+1) up to 1/2^j, joined with skip j
        self.decoders = nn.ModuleList(
            UnetrUpBlock(
                in_channels=embed_dim if j == levels - 1 else fs * 2 ** (j + 1),
                out_channels=fs * 2**j,
                upsample_kernel_size=2,
                **conv,
            )
            for j in reversed(range(levels))
        )
        self.out = UnetOutBlock(
            spatial_dims=3, in_channels=fs, out_channels=out_channels, dropout=dropout or None
        )

    def forward(
        self, image: torch.Tensor, features: list[torch.Tensor], grid: tuple[int, ...]
    ) -> torch.Tensor:
        if len(features) != self.levels:
            raise ValueError(f"the decoder needs {self.levels} token features, got {len(features)}")
        skips = [self.encoder0(image)]
        skips += [enc(tokens_to_grid(f, grid)) for enc, f in zip(self.encoders, features[:-1], strict=True)]
        x = tokens_to_grid(features[-1], grid)
        for dec, skip in zip(self.decoders, reversed(skips), strict=True):
            x = dec(x, skip)
        return self.out(x)
