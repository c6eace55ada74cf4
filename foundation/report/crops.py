"""The crops a pretraining run's model saw: its own domain, data and augmentations, re-drawn from its config.

Samples and views come from the run's resolved config with the training seed's generators, so the grid shows
the kind of views the objective was given (the exact crops of a step depend on rank and worker too). Views
are built on the CPU workers' path (``data.augment_on=workers``): the same augmentations as on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from foundation.config import load_config
from foundation.data.seeding import generator_for
from foundation.domain import get_domain, resolve_data_path
from foundation.plotting import new_figure, png_bytes
from foundation.visualize.inputs import VisualInput, from_normalised

CROP_SEED = 0x5EE


@dataclass(frozen=True)
class CropSample:
    """One sample's views (``C x H x W`` or ``C x D x H x W``, normalised) and the statistics they used."""

    views: tuple[tuple[str, torch.Tensor], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def draw_crops(run: Path, samples: int) -> list[CropSample]:
    """``samples`` samples of the run's data through its SSL transform.

    Raises:
        FoundationError: the config, domain or data cannot be used (the caller reports why, in the page).
    """
    cfg = load_config(Path(run) / "config.yaml", ["data.augment_on=workers"])
    domain = get_domain(cfg.domain)
    source, spec = domain.sample_source(resolve_data_path(domain, cfg.data.path), cfg)
    transform = domain.ssl_transform(cfg, spec)
    mean, std = spec.mean, spec.std
    out = []
    for i in range(samples):
        g = generator_for(cfg.seed, CROP_SEED, i)
        views = transform(source.sample(i, g), g)
        named = [(f"global {k + 1}", v) for k, v in enumerate(views.get("global_crops", []))]
        named += [(f"local {k + 1}", v) for k, v in enumerate(views.get("local_crops", []))]
        if "image" in views:
            named.append(("MAE view", views["image"]))
        out.append(CropSample(tuple((n, torch.as_tensor(v).float()) for n, v in named), mean, std))
    return out


def _shown(view: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """De-normalised, the first three channels (or one), the middle axial slice of a 3D crop, in [0, 1]."""
    c = view.shape[0]
    shape = (c,) + (1,) * (view.ndim - 1)
    x = view * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    if x.ndim == 4:
        x = x[..., x.shape[-1] // 2]
    x = x[:3] if c >= 3 else x[:1]
    if c != 3:  # bands and intensities: stretch for the eye; RGB as the model saw it
        flat = x.reshape(x.shape[0], -1)
        lo, hi = flat.quantile(0.02, dim=1).view(-1, 1, 1), flat.quantile(0.98, dim=1).view(-1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    arr = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def crop_grid(samples: list[CropSample]) -> bytes:
    """One row per sample, one column per view, each at its own pixel size."""
    cols = max(len(s.views) for s in samples)
    fig = new_figure(max(4.5, 1.5 * cols), 1.6 * len(samples) + 0.4)
    fig.suptitle("augmented views the objective is given (one row per sample)", fontsize=9)
    grid = fig.add_gridspec(len(samples), cols)
    for r, sample in enumerate(samples):
        for c, (name, view) in enumerate(sample.views):
            ax = fig.add_subplot(grid[r, c])
            image = _shown(view, sample.mean, sample.std)
            ax.imshow(
                image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
            )
            ax.set_title(f"{name} {view.shape[-1]}px", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    return png_bytes(fig, "crop grid")


def first_views(samples: list[CropSample]) -> list[VisualInput]:
    """The first (global) view of each sample as a visualize input, de-normalised back to model units."""
    return [
        from_normalised(f"sample{k}", f"sample {k + 1}, {s.views[0][0]}", s.views[0][1], s.mean, s.std)
        for k, s in enumerate(samples)
    ]
