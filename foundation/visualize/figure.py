"""One input's picture: the input as the model saw it, the PCA of its patches, and its CLS attention maps."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from foundation.plotting import new_figure, png_bytes
from foundation.visualize.inputs import PlaneView, VisualInput
from foundation.visualize.tokens import TokenMaps

MAX_HEAD_COLUMNS = 6


@dataclass(frozen=True)
class Panels:
    """The 2D arrays of one plane: ``image`` H x W (x 3), ``pca`` h x w x 3, ``attention`` heads x h x w."""

    label: str
    image: np.ndarray
    pca: np.ndarray
    attention: np.ndarray | None


def display_image(shown: torch.Tensor, item: VisualInput) -> torch.Tensor:
    """``C x *spatial`` de-normalised pixels -> the shown channels in [0, 1] (stretched for rasters/CT)."""
    picked = shown[list(item.display)].float()
    if item.stretch:
        flat = picked.reshape(picked.shape[0], -1)
        lo = torch.quantile(flat, 0.02, dim=1).view(-1, *([1] * (picked.ndim - 1)))
        hi = torch.quantile(flat, 0.98, dim=1).view(-1, *([1] * (picked.ndim - 1)))
        picked = (picked - lo) / (hi - lo).clamp_min(1e-8)
    return picked.clamp(0, 1)


def _plane(t: torch.Tensor, axis: int, view: PlaneView) -> torch.Tensor:
    """The middle slice of ``t`` (leading dims, then 3 spatial) along spatial ``axis``, oriented for display."""
    dim = t.ndim - 3 + axis
    out = t.select(dim, t.shape[dim] // 2)
    if view.transpose:
        out = out.transpose(-1, -2)
    if view.flip:
        out = out.flip(-1, -2)
    return out


def panels(item: VisualInput, shown: torch.Tensor, maps: TokenMaps, pca_rgb: torch.Tensor) -> list[Panels]:
    """The planes to draw: one for a 2D input, one per :class:`PlaneView` of a 3D input."""
    image = display_image(shown, item)  # c x *spatial
    pca = pca_rgb.T.reshape(3, *maps.grid)
    att = None if maps.attention is None else maps.attention.reshape(-1, *maps.grid)
    if len(maps.grid) == 2:
        return [Panels("", _hwc(image), _hwc(pca), None if att is None else att.numpy())]
    out = []
    for view in item.planes or (PlaneView(0, "axis 0"), PlaneView(1, "axis 1"), PlaneView(2, "axis 2")):
        out.append(
            Panels(
                view.label,
                _hwc(_plane(image, view.axis, view)),
                _hwc(_plane(pca, view.axis, view)),
                None if att is None else _plane(att, view.axis, view).numpy(),
            )
        )
    return out


def _hwc(t: torch.Tensor) -> np.ndarray:
    """``C x H x W`` -> ``H x W x C`` (``H x W`` for one channel)."""
    arr = t.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _show(ax, array: np.ndarray, title: str, extent, **kw) -> None:
    ax.imshow(array, extent=extent, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def render(item: VisualInput, planes: list[Panels], maps: TokenMaps, *, background_removed: bool) -> bytes:
    """The PNG of one input. 2D: input, PCA and mean attention on top, one map per head below. 3D: one row
    per plane (input, PCA, mean attention, heads)."""
    heads = 0 if planes[0].attention is None else planes[0].attention.shape[0]
    two_d = len(planes) == 1
    if two_d:
        head_cols = min(max(heads, 1), MAX_HEAD_COLUMNS)
        cols = max(3, head_cols)
        rows = 1 + (-(-heads // cols) if heads else 0)
    else:
        cols, rows = 3 + heads, len(planes)
    fig = new_figure(2.2 * cols, 2.3 * rows + 0.4)
    grid = fig.add_gridspec(rows, cols)
    reg = f", {maps.registers} registers (CLS->registers {maps.register_share:.0%})" if maps.registers else ""
    fig.suptitle(textwrap.fill(f"{item.title}{reg}", width=int(16 * cols)), fontsize=9)
    pca_title = "PCA 1-3 of patches" + (" (background removed)" if background_removed else "")
    for r, plane in enumerate(planes):
        h, w = plane.image.shape[:2]
        extent = (0, w, h, 0)
        label = f"{plane.label}:\n" if plane.label else ""
        grey = {"cmap": "gray", "vmin": 0, "vmax": 1} if plane.image.ndim == 2 else {}
        _show(
            fig.add_subplot(grid[r, 0]),
            plane.image,
            f"{label}input as the model saw it".strip(),
            extent,
            **grey,
        )
        _show(fig.add_subplot(grid[r, 1]), plane.pca, pca_title, extent)
        if plane.attention is None:
            ax = fig.add_subplot(grid[r, 2])
            ax.axis("off")
            ax.text(0.5, 0.5, "no class token:\nno CLS attention", ha="center", va="center", fontsize=8)
            continue
        _show(fig.add_subplot(grid[r, 2]), plane.attention.mean(0), "CLS attention, mean of heads", extent,
              cmap="inferno")  # fmt: skip
        for k in range(heads):
            cell = grid[1 + k // cols, k % cols] if two_d else grid[r, 3 + k]
            _show(fig.add_subplot(cell), plane.attention[k], f"head {k + 1}", extent, cmap="inferno")
    return png_bytes(fig, item.title)
