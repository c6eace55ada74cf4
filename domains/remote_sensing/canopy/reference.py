"""``canopy-height --quicklook --labels REF``: a map compared with a reference canopy-height raster (lidar CHM,
field plots rasterised), as the predicted-vs-true density and per-height-bin error plots next to the map.

The reference is read on the map's grid (warped like training labels when its grid differs) in row strips, so
any scene size fits in bounded memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from foundation_domains.remote_sensing.canopy.metrics import BLOCK, CanopyMetrics, scalar_metrics
from foundation_domains.remote_sensing.canopy.plots import check_error_plots, write_error_plots

log = logging.getLogger(__name__)

STRIP_ROWS = 20 * BLOCK  # whole blocks per strip: block R^2 sees the same blocks as on the whole map


def find_reference(scene: Path, labels: str | None) -> Path | None:
    """The reference of ``scene``: ``labels`` itself when it is a file, else the raster under that folder with
    the scene's file stem (None when there is none: the map gets no comparison, and the log says so)."""
    if not labels:
        return None
    from foundation_domains.remote_sensing.raster import list_rasters, raster_stem

    root = Path(labels)
    if root.is_file():
        return root
    stem = raster_stem(scene)  # a scene may be a URL
    matches = [p for p in list_rasters(root) if p.stem == stem]
    if not matches:
        log.info("%s: no reference raster named %s.* under %s; no comparison plots", scene, stem, root)
    return matches[0] if matches else None


def plot_stem(map_path: Path) -> Path:
    """Plots of ``chm.tif`` are ``chm_density.png`` and ``chm_height_bins.png``."""
    return map_path.with_suffix("")


def check_reference_plots(map_path: Path, inputs: list[Path]) -> None:
    """Before any work: the plot names are no input and no file that is not our plot."""
    check_error_plots(plot_stem(map_path), inputs)


def compare(map_path: Path, reference: Path, nodata: float | None = None) -> CanopyMetrics:
    """Metrics of the map against the reference on the map's grid (NaN in either: not counted).

    Raises:
        DataError: the reference cannot be read or does not overlap the map (names both).
    """
    from rasterio.windows import Window

    from foundation_domains.remote_sensing.canopy.data import Pair, open_pair

    metrics = CanopyMetrics()
    with open_pair(Pair(map_path, reference), "bilinear", nodata) as (ds, labels):
        for r0 in range(0, ds.height, STRIP_ROWS):
            window = Window(0, r0, ds.width, min(STRIP_ROWS, ds.height - r0))
            metrics.add(ds.read(1, window=window, out_dtype="float32"), labels.read(window))
    return metrics


def reference_plots(map_path: Path, reference: Path) -> dict[str, Any]:
    """Compare and draw; returns what the scene's JSON line reports (plot paths, metrics, the reference)."""
    metrics = compare(map_path, reference)
    plots = write_error_plots(metrics, plot_stem(map_path), f"{map_path.name} vs {reference.name}")
    return {
        "reference": str(reference),
        "plots": plots,
        "reference_metrics": scalar_metrics(metrics.compute()),
    }
