"""Pictures of canopy-height errors: predicted vs true density, and the error per label-height bin.

Both are drawn from :class:`CanopyMetrics` sums (a 2D histogram and per-bin moments), so they cover every
evaluated pixel of any number of images in bounded memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from foundation.plotting import check_png_target, new_figure, png_bytes, write_png
from foundation_domains.remote_sensing.canopy.metrics import DENSITY_MAX, CanopyMetrics


def density_plot(metrics: CanopyMetrics, title: str) -> bytes:
    """Predicted (y) against true (x) height, pixel counts on a log colour scale, with the 1:1 line."""
    from matplotlib.colors import LogNorm

    fig = new_figure(5.2, 4.4)
    ax = fig.add_subplot()
    counts = metrics.density.T.astype(float)  # rows: prediction
    shown = np.where(counts > 0, counts, np.nan)
    extent = (0, DENSITY_MAX, 0, DENSITY_MAX)
    vmax = max(1.0, float(np.nanmax(shown)) if np.isfinite(shown).any() else 1.0)
    image = ax.imshow(
        shown, origin="lower", extent=extent, cmap="viridis", norm=LogNorm(1, vmax), aspect="auto"
    )
    ax.plot([0, DENSITY_MAX], [0, DENSITY_MAX], color="red", linewidth=0.8, label="1:1")
    result = metrics.compute()
    text = ", ".join(
        f"{k} {result[k]:.2f}" for k in ("mae", "rmse", "r2", "bias") if result.get(k) is not None
    )
    ax.set_title(f"{title}\n{text}", fontsize=8)
    ax.set_xlabel("true height (m)")
    ax.set_ylabel("predicted height (m)")
    ax.legend(fontsize=7, loc="upper left")
    fig.colorbar(image, ax=ax, label="pixels")
    return png_bytes(fig, f"{title}: predicted vs true")


def bins_plot(metrics: CanopyMetrics, title: str) -> bytes:
    """Per label-height bin: mean error (bias) with +-1 std error bars, MAE, and the pixel count."""
    bins = metrics.compute()["height_bins"]
    names = [f"{b['range']}\nn={b['count']}" for b in bins]
    x = np.arange(len(bins))
    nan = float("nan")
    bias = np.array([nan if b["bias"] is None else b["bias"] for b in bins])
    std = np.array([nan if b["error_std"] is None else b["error_std"] for b in bins])
    mae = np.array([nan if b["mae"] is None else b["mae"] for b in bins])
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, mae, width=0.4, color="#9bb", label="MAE")
    ax.errorbar(x + 0.2, bias, yerr=std, fmt="o", color="#c33", capsize=3, label="bias (pred - true) +- std")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xticks(x, names, fontsize=7)
    ax.set_xlabel("true height bin (m), pixels")
    ax.set_ylabel("error (m)")
    ax.set_title(f"{title}: error per height bin", fontsize=8)
    ax.legend(fontsize=7)
    return png_bytes(fig, f"{title}: error per height bin")


def plot_paths(stem: Path) -> tuple[Path, Path]:
    """Where the two plots of ``stem`` go: ``<stem>_density.png`` and ``<stem>_height_bins.png``."""
    return stem.with_name(f"{stem.name}_density.png"), stem.with_name(f"{stem.name}_height_bins.png")


def check_error_plots(stem: Path, inputs: list[Path]) -> None:
    """Refuse, before any work, plot paths that are inputs or files that are not our plots."""
    for path in plot_paths(stem):
        check_png_target(path, inputs)


def write_error_plots(metrics: CanopyMetrics, stem: Path, title: str) -> dict[str, Any]:
    """Both plots, each written atomically (an earlier plot of ours is replaced); returns their paths."""
    density, bins = plot_paths(stem)
    write_png(density, density_plot(metrics, title))
    write_png(bins, bins_plot(metrics, title))
    return {"density": str(density), "height_bins": str(bins)}
