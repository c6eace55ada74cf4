"""A DPT decoder (Ranftl et al. 2021, arXiv 2103.13413) on our ViT, as in the canopy-height models of
Tolan et al. 2023 (arXiv 2304.07213) and CHMv2.

Patch tokens after four evenly spaced blocks are reassembled into maps at 1/4, 1/8, 1/16 and 1/32 of the
input, fused coarse to fine by residual convolution units, and upsampled to the input resolution. Only the
backbone contract is used (``get_intermediate_layers``, ``patch_size``, ``embed_dim``, ``blocks``), so any
depth, patch size or register count works.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from foundation.config import reject_unknown_keys
from foundation.errors import ConfigError

MODES = ("bins", "regression")
MAX_HEIGHT = 96.0  # metres; CHMv2's range
SCALES = (4, 8, 16, 32)  # the four reassembled maps are 1/4 .. 1/32 of the input


@dataclass(frozen=True)
class HeadOptions:
    """The head's architecture (``task.options.head`` in a recipe; stored in the model's ``task_meta``).

    Attributes:
        mode: ``bins`` (classification over ``bins`` height bins, prediction = expectation over bin
            centres) or ``regression`` (one non-negative output in metres).
        features: channels of the fusion stages.
        bins: number of bins, centred on ``0 .. max_height`` evenly.
        max_height: top of the height range in metres.
        layers: 0-based backbone blocks to read; default four evenly spaced ones ending with the last.
    """

    mode: str = "bins"
    features: int = 64
    bins: int = 64
    max_height: float = MAX_HEIGHT
    layers: tuple[int, ...] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, cfg: Any = None) -> HeadOptions:
        """Raises: ConfigError: unknown key or bad value, named as ``task.options.head.KEY``."""
        options = dict(options or {})
        reject_unknown_keys(options, cls, "task.options.head", "the canopy-height head")
        if options.get("layers") is not None:
            options["layers"] = tuple(int(i) for i in options["layers"])
        try:
            opts = cls(**options)
        except TypeError as e:
            raise ConfigError(f"task.options.head: {e}") from e
        opts._check()
        return opts

    def _check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"task.options.head.mode={self.mode!r} is not one of {list(MODES)}")
        if int(self.features) < 4:
            raise ConfigError(f"task.options.head.features={self.features!r} must be >= 4")
        if self.mode == "bins" and int(self.bins) < 2:
            raise ConfigError(f"task.options.head.bins={self.bins!r} must be >= 2")
        if not float(self.max_height) > 0:
            raise ConfigError(f"task.options.head.max_height={self.max_height!r} must be > 0")
        if self.layers is not None and len(self.layers) != len(SCALES):
            raise ConfigError(f"task.options.head.layers={list(self.layers)!r} must name 4 blocks")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with ``layers`` as a list (or None)."""
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @property
    def out_channels(self) -> int:
        return int(self.bins) if self.mode == "bins" else 1


def default_layers(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last (depth 12 -> 2, 5, 8, 11; depth 3 -> 0, 1, 1, 2)."""
    return [max(0, math.ceil(depth * (i + 1) / 4) - 1) for i in range(4)]


def _resample(channels: int, factor: float) -> nn.Module:
    """Bring the patch grid to ``factor`` times its size: transposed conv up, strided conv down."""
    if factor == 1:
        return nn.Identity()
    if factor > 1 and float(factor).is_integer():
        k = int(factor)
        return nn.ConvTranspose2d(channels, channels, kernel_size=k, stride=k)
    k = round(1 / factor)
    if factor < 1 and abs(1 / factor - k) < 1e-9 and k & (k - 1) == 0:
        # DPT's 3x3 stride-2 conv, repeated for coarser maps (works on grids smaller than the factor)
        steps = k.bit_length() - 1
        return nn.Sequential(
            *(nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1) for _ in range(steps))
        )
    return _Interpolate(factor)  # patch sizes that are not powers of two (e.g. 14)


class _Interpolate(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the input (DPT's RCU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Add the skip map (after an RCU) to the coarser path, refine with an RCU, upsample to ``size``.
    The coarsest block has no skip input (and no parameters for one: DDP needs every parameter used)."""

    def __init__(self, channels: int, with_skip: bool = True) -> None:
        super().__init__()
        self.skip = ResidualConvUnit(channels) if with_skip else None
        self.refine = ResidualConvUnit(channels)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if self.skip is not None and skip is not None:
            x = x + self.skip(skip)
        x = self.refine(x)
        return self.proj(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class DPTHead(nn.Module):
    """Tokens of four blocks -> a dense map ``B x out_channels x H x W`` at the input resolution."""

    def __init__(self, embed_dim: int, patch_size: int, depth: int, opts: HeadOptions) -> None:
        super().__init__()
        self.opts = opts
        self.patch_size = patch_size
        self.layers = list(opts.layers) if opts.layers is not None else default_layers(depth)
        bad = [i for i in self.layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(
                f"task.options.head.layers={self.layers!r}: block(s) {bad} do not exist in a backbone of "
                f"depth {depth}"
            )
        f = int(opts.features)
        self.reassemble = nn.ModuleList(
            nn.Sequential(nn.Conv2d(embed_dim, f, 1), _resample(f, patch_size / s)) for s in SCALES
        )
        self.fusion = nn.ModuleList(FusionBlock(f, with_skip=i < len(SCALES) - 1) for i in range(len(SCALES)))
        half = max(f // 2, 1)
        self.out = nn.Sequential(
            nn.Conv2d(f, half, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, opts.out_channels, 1),
        )

    def forward(
        self, tokens: list[torch.Tensor], grid: tuple[int, ...], size: tuple[int, int]
    ) -> torch.Tensor:
        """``tokens``: four ``B x N x E`` patch-token tensors on ``grid``; ``size``: the input's ``(H, W)``."""
        h, w = grid
        maps = []
        for t, stage, s in zip(tokens, self.reassemble, SCALES, strict=True):
            x = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
            x = stage(x)
            target = (math.ceil(size[0] / s), math.ceil(size[1] / s))
            if tuple(x.shape[-2:]) != target:  # odd grids: strided convs round differently
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            maps.append(x)
        # coarse to fine: 1/32 -> 1/16 -> 1/8 -> 1/4 -> 1/2
        x = self.fusion[3](maps[3], None, tuple(maps[2].shape[-2:]))
        x = self.fusion[2](x, maps[2], tuple(maps[1].shape[-2:]))
        x = self.fusion[1](x, maps[1], tuple(maps[0].shape[-2:]))
        x = self.fusion[0](x, maps[0], (math.ceil(size[0] / 2), math.ceil(size[1] / 2)))
        x = F.interpolate(self.out[0](x), size=size, mode="bilinear", align_corners=False)
        return self.out[1:](x)
