"""Inputs -> backbone -> pictures, shared by ``foundation visualize`` and ``foundation report``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from foundation.plotting import new_figure, png_bytes
from foundation.visualize.figure import Panels, panels, render
from foundation.visualize.inputs import VisualInput
from foundation.visualize.pca import PatchPCA, fit_patch_pca
from foundation.visualize.tokens import TokenMaps, prepare, token_maps


@dataclass(frozen=True)
class Seen:
    """One input after the backbone: what to draw."""

    item: VisualInput
    shown: torch.Tensor
    maps: TokenMaps


def see(
    backbone: torch.nn.Module,
    items: Iterable[VisualInput],
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    device: torch.device,
    progress: bool = False,
) -> list[Seen]:
    """Every input through ``backbone`` (normalised with ``mean``/``std`` when given, else the input's own)."""
    channels, patch = int(backbone.in_chans), int(backbone.patch_size)
    dims = int(getattr(backbone, "spatial_dims", 2))
    seen = []
    for item in tqdm(items, desc="visualize", unit="input", disable=not progress):
        ready = prepare(item, channels=channels, patch=patch, spatial_dims=dims, mean=mean, std=std)
        seen.append(Seen(item, ready.shown, token_maps(backbone, ready.normalised, device)))
    return seen


def fit(seen: Sequence[Seen], *, keep_background: bool = False) -> PatchPCA:
    """One PCA over the patch tokens of every seen input."""
    return fit_patch_pca(
        [s.maps.patch for s in seen], [s.maps.grid for s in seen], remove_background=not keep_background
    )


def picture(s: Seen, rgb: torch.Tensor, pca: PatchPCA) -> bytes:
    """The full picture of one input (input, PCA, attention mean and per head)."""
    return render(
        s.item, panels(s.item, s.shown, s.maps, rgb), s.maps, background_removed=pca.background_removed
    )


def overview(seen: Sequence[Seen], pca: PatchPCA, title: str) -> bytes:
    """A compact grid, one row per input plane: input, PCA, mean CLS attention (for reports)."""
    rows: list[Panels] = [
        p for s, rgb in zip(seen, pca.rgb, strict=True) for p in panels(s.item, s.shown, s.maps, rgb)
    ]
    fig = new_figure(6.3, 2.0 * len(rows) + 0.4)
    fig.suptitle(title, fontsize=9)
    grid = fig.add_gridspec(len(rows), 3)
    for r, plane in enumerate(rows):
        h, w = plane.image.shape[:2]
        cells = [(plane.image, "input"), (plane.pca, "PCA 1-3"), (None, "CLS attention (mean)")]
        for c, (array, name) in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if array is None:
                if plane.attention is None:
                    ax.axis("off")
                    continue
                array = plane.attention.mean(0)
                ax.imshow(array, extent=(0, w, h, 0), interpolation="nearest", cmap="inferno")
                continue
            grey = {"cmap": "gray", "vmin": 0, "vmax": 1} if np.ndim(array) == 2 else {}
            ax.imshow(array, extent=(0, w, h, 0), interpolation="nearest", **grey)
    return png_bytes(fig, title)
