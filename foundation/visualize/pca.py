"""PCA of patch tokens as RGB, fitted over every input of a call (DINOv2, arXiv 2304.07193, Fig. 1).

As in the paper's figure: a first PCA over all patches, thresholded on its first component, separates
foreground from background; a second PCA over the foreground patches gives the three components shown as
RGB, background black. One fit over all inputs gives matching parts of different inputs the same colour.
Which side of the threshold is background is not fixed by PCA (a component's sign is arbitrary): the side
that holds more of the patches on the inputs' borders is taken as background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchPCA:
    """Per input: ``rgb`` ``(N, 3)`` in [0, 1] and ``foreground`` ``(N,)`` bool, in the inputs' patch order."""

    rgb: tuple[torch.Tensor, ...]
    foreground: tuple[torch.Tensor, ...]
    background_removed: bool


def _components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and the top ``k`` principal directions ``(E, k)`` of rows ``x``, signs fixed (largest loading
    positive) so that the colours do not flip between runs. ``eigh`` of the covariance: deterministic."""
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(1, x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors[:, -k:].flip(-1)
    signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return mean, top * torch.where(signs == 0, 1.0, signs)


def border_mask(grid: Sequence[int]) -> torch.Tensor:
    """``True`` for patches on the border of a 2D or 3D patch grid (flattened in row-major order)."""
    idx = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    border = torch.zeros(tuple(grid), dtype=torch.bool)
    for axis, g in zip(idx, grid, strict=True):
        border |= (axis == 0) | (axis == g - 1)
    return border.flatten()


def _scale(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each column to [0, 1] between the 1st and 99th percentiles of ``reference`` (robust to outliers)."""
    lo = torch.quantile(reference, 0.01, dim=0)
    hi = torch.quantile(reference, 0.99, dim=0)
    return ((values - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def fit_patch_pca(
    tokens: Sequence[torch.Tensor], grids: Sequence[Sequence[int]], *, remove_background: bool = True
) -> PatchPCA:
    """Fit on the patch tokens ``(N_i, E)`` of every input (their grids give the borders) and project.

    With ``remove_background`` (and enough patches on each side of the threshold) the first component's
    threshold at its mean splits background from foreground; otherwise every patch is foreground.
    """
    sizes = [int(t.shape[0]) for t in tokens]
    x = torch.cat([t.reshape(t.shape[0], -1) for t in tokens]).double()
    foreground = torch.ones(x.shape[0], dtype=torch.bool)
    removed = False
    if remove_background and x.shape[0] >= 8:
        mean, first = _components(x, 1)
        high = ((x - mean) @ first)[:, 0] > 0
        border = torch.cat([border_mask(g) for g in grids])
        high_is_background = high[border].float().mean() > 0.5
        candidate = ~high if high_is_background else high
        if 3 <= int(candidate.sum()) < x.shape[0]:
            foreground, removed = candidate, True
    fg = x[foreground]
    k = min(3, fg.shape[0], fg.shape[1])
    mean, top = _components(fg, k)
    projected = (x - mean) @ top
    if k < 3:
        projected = torch.cat([projected, projected.new_zeros(x.shape[0], 3 - k)], dim=1)
    rgb = _scale(projected, projected[foreground]).float()
    rgb[~foreground] = 0.0
    return PatchPCA(tuple(rgb.split(sizes)), tuple(foreground.split(sizes)), removed)
