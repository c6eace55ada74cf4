"""Line plots of metric series (Agg, no pyplot), one PNG per figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from foundation.plotting import new_figure, png_bytes
from foundation.report.runlog import Series


@dataclass(frozen=True)
class Panel:
    """One axes: its series, and horizontal reference lines ``(value, label)`` (e.g. ln K)."""

    title: str
    series: tuple[Series, ...]
    ylabel: str = ""
    references: tuple[tuple[float, str], ...] = field(default_factory=tuple)
    log_y: bool = False


def line_plot(title: str, panels: Sequence[Panel], columns: int = 2) -> bytes:
    """A grid of line plots over steps."""
    panels = [p for p in panels if p.series]
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = new_figure(4.6 * cols, 2.9 * rows + 0.3)
    fig.suptitle(title, fontsize=10)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        for s in panel.series:
            marker = "o" if len(s.steps) < 30 else None
            ax.plot(s.steps, s.values, label=s.key, marker=marker, markersize=3, linewidth=1.2)
        for value, label in panel.references:
            ax.axhline(value, color="grey", linestyle="--", linewidth=0.8, label=label)
        if panel.log_y and all(v > 0 for s in panel.series for v in s.values):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel.series) + len(panel.references) > 1:
            ax.legend(fontsize=7)
    return png_bytes(fig, title)
