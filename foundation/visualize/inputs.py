"""The seam between ``foundation visualize`` and the domains: what is asked, and what a domain hands back.

A domain that can be visualised has a method ``visual_inputs(request: VisualRequest) -> Iterator[VisualInput]``
(:class:`VisualSource`). It reads its own formats (slides, rasters, volumes) and returns pixels in the units
the model is trained on, *before* mean/std: the core normalises them with the backbone's statistics, so the
picture shows exactly what the model was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from foundation.errors import ConfigError


@dataclass(frozen=True)
class VisualRequest:
    """What the user asked for; each domain uses the options that make sense for it and refuses the rest.

    Attributes:
        inputs: paths as given on the command line.
        size: side in pixels of a model input (tile, window, slice), a multiple of ``patch_size``.
        patch_size: the backbone's patch side.
        spatial_dims: 2 or 3, the backbone's.
        channels: the backbone's input channels.
        region: ``x, y, w, h`` (slide: level-0 pixels; raster: pixel window); None: the domain's default.
        mpp: microns per pixel to read a slide at.
        bands: 1-based raster bands fed to the model, in order.
        rgb: 1-based raster bands of the colour composite shown next to the maps.
        max_tiles: at most this many tiles of a slide or feature file.
        options: the domain's reading options (``--option KEY=VALUE``, values parsed as YAML), named as its
            ``data.options`` (e.g. ``modality=mr`` for volumes, ``slide_mpp=0.25`` for slides).
    """

    inputs: tuple[str, ...]
    size: int
    patch_size: int
    spatial_dims: int = 2
    channels: int = 3
    region: tuple[int, int, int, int] | None = None
    mpp: float | None = None
    bands: tuple[int, ...] | None = None
    rgb: tuple[int, int, int] | None = None
    max_tiles: int = 8
    options: dict[str, Any] = field(default_factory=dict)

    def refuse(self, domain: str, *names: str, options: tuple[str, ...] = ()) -> None:
        """Refuse flags this domain has no use for, and ``--option`` keys other than ``options`` (a silently
        ignored setting is a wrong picture)."""
        given = [n for n in names if getattr(self, n) is not None]
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            raise ConfigError(f"{flags}: not used by the {domain!r} domain's visualize inputs")
        unknown = sorted(set(self.options) - set(options))
        if unknown:
            raise ConfigError(
                f"--option {', '.join(unknown)}: not an option of the {domain!r} domain's visualize inputs; "
                f"allowed: {list(options) or 'none'}"
            )


@dataclass(frozen=True)
class PlaneView:
    """One 2D plane shown of a 3D input: the middle slice along ``axis`` (0, 1, 2 of the spatial axes),
    transposed and/or flipped for display (e.g. radiological orientation)."""

    axis: int
    label: str
    transpose: bool = False
    flip: bool = False


@dataclass(frozen=True)
class VisualInput:
    """One picture's worth of input, ready for the backbone but for normalisation.

    Attributes:
        name: file-name stem of its PNG (unique within a call; the core makes it so).
        title: what it is (path, region, plane) for the figure and error messages.
        pixels: ``C x H x W`` (or ``C x D x H x W``) float32 in model units before mean/std.
        mean, std: the domain's statistics, used when the backbone records none.
        display: channels shown (three as RGB, one as grey).
        stretch: 2-98 percentile stretch per shown channel (reflectance, CT); else values in [0, 1] as they are.
        planes: the planes shown of a 3D input.
    """

    name: str
    title: str
    pixels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    display: tuple[int, ...] = (0, 1, 2)
    stretch: bool = False
    planes: tuple[PlaneView, ...] = field(default_factory=tuple)


@runtime_checkable
class VisualSource(Protocol):
    """A domain that ``foundation visualize`` can read inputs of."""

    def visual_inputs(self, request: VisualRequest) -> Iterator[VisualInput]: ...


def fit_to_patches(image: torch.Tensor, longer_side: int, patch: int) -> torch.Tensor:
    """``C x H x W`` resized (bilinear, aspect kept) so its longer side is ``longer_side`` and both sides are
    multiples of ``patch`` (at least one patch): slices and windows of any shape become a valid ViT input."""
    h, w = image.shape[-2:]
    scale = longer_side / max(h, w)
    new = [max(patch, round(s * scale / patch) * patch) for s in (h, w)]
    if new == [h, w]:
        return image
    return F.interpolate(image[None].float(), size=new, mode="bilinear", align_corners=False)[0]


def rgb_channels(channels: int) -> tuple[int, ...]:
    """Channels shown by default: the first three, or the only one."""
    return (0, 1, 2) if channels >= 3 else (0,)


def from_normalised(
    name: str, title: str, view: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> VisualInput:
    """A view the model was given (after mean/std) back in model units, as visualize takes it: three or more
    channels shown as RGB, others as grey with a stretch."""
    c = view.shape[0]
    shape = (c,) + (1,) * (view.ndim - 1)
    pixels = view.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    display = (0, 1, 2) if c >= 3 else (0,)
    return VisualInput(name, title, pixels, tuple(mean), tuple(std), display, c != 3)
