"""Per-band statistics over whole scenes or datasets, streamed window by window in bounded memory.

Statistics are computed once for the data (never per tile, so tiles agree; shared/reference/remote_sensing.md)
in the units the model sees before normalisation (pixel values divided by the ``scale`` option), with
invalid pixels excluded. Mean and standard deviation are exact for the windows read (Chan et al.'s pairwise
update in float64); the 2nd/98th percentiles come from a bounded random subsample of valid pixels, exact when
all valid pixels fit in it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import numpy as np
from rasterio.windows import Window
from tqdm import tqdm

from domains.remote_sensing.raster import RasterInfo, open_raster, read_window
from foundation.errors import DataError

STATS_VERSION = 1


@dataclass
class BandStats:
    """Per-band statistics and the settings they were computed with (band selection, scale option)."""

    bands: list[int] | None  # the selection asked for (None: the files' own data bands)
    scale: str | float  # the scale option ('auto' or a divisor)
    mean: list[float]
    std: list[float]
    p2: list[float]
    p98: list[float]
    pixels: int  # valid pixels used for mean/std
    files: int
    windows: int

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": STATS_VERSION, **asdict(self)}, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BandStats:
        """Raises: DataError: missing file, not JSON, or fields missing / of unequal lengths."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            data.pop("version", None)
            stats = cls(**data)
        except FileNotFoundError as e:
            raise DataError(
                f"statistics file {str(path)!r} does not exist; write it with `foundation stats`"
            ) from e
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a band statistics file written by `foundation stats` ({e})") from e
        n = len(stats.mean)
        if n == 0 or any(len(v) != n for v in (stats.std, stats.p2, stats.p98)):
            raise DataError(f"{path}: mean/std/p2/p98 must have one value per band")
        return stats


def grid_windows(width: int, height: int, size: int) -> list[Window]:
    """Windows of ``size`` covering the raster row by row (the last row/column clipped)."""
    return [
        Window(col, row, min(size, width - col), min(size, height - row))
        for row in range(0, height, size)
        for col in range(0, width, size)
    ]


def plan_windows(
    infos: Sequence[RasterInfo], window: int, max_windows: int | None, seed: int
) -> list[tuple[int, Window]]:
    """All grid windows of all rasters, or at most ``max_windows`` of them drawn at random (area-weighted).

    The result is sorted by file and position so each file is opened once and read in order.
    """
    grids = [grid_windows(i.width, i.height, window) for i in infos]
    total = sum(len(g) for g in grids)
    if max_windows is None or total <= max_windows:
        return [(f, w) for f, g in enumerate(grids) for w in g]
    rng = np.random.default_rng(seed)
    counts = np.array([len(g) for g in grids], dtype=np.float64)
    chosen: set[tuple[int, int]] = set()
    for _ in range(20 * max_windows):  # bounded: with replacement, duplicates discarded
        if len(chosen) == max_windows:
            break
        f = int(rng.choice(len(grids), p=counts / counts.sum()))
        chosen.add((f, int(rng.integers(len(grids[f])))))
    return [(f, grids[f][k]) for f, k in sorted(chosen)]


class _Moments:
    """Running count, mean and sum of squared deviations per band (Chan et al. 1979 pairwise merge)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        nx, mx = len(x), x.mean(axis=0)
        delta = mx - self.mean
        total = self.n + nx
        self.mean = self.mean + delta * nx / total
        self.m2 = self.m2 + ((x - mx) ** 2).sum(axis=0) + delta**2 * self.n * nx / total
        self.n = total


def compute_band_stats(
    infos: Sequence[RasterInfo],
    scales: Sequence[float],
    *,
    bands: Sequence[int] | None = None,
    scale_option: str | float = "auto",
    nodata: float | None = None,
    window: int = 512,
    max_windows: int | None = None,
    max_pixels: int = 500_000,
    seed: int = 0,
    progress: bool = False,
) -> BandStats:
    """Statistics of the valid pixels of ``infos``, each file divided by its entry of ``scales``.

    Args:
        infos: rasters with the same channel count (from :func:`scan_rasters`).
        scales: one divisor per raster (:func:`value_scale`).
        bands, scale_option: recorded in the result so a loaded file can be checked against the run.
        nodata: extra nodata value (raw units).
        window: side of the windows read.
        max_windows: read at most this many windows (random, seeded); None reads everything.
        max_pixels: size of the pixel subsample kept for percentiles.

    Raises:
        DataError: no valid pixel in the windows read.
    """
    plan = plan_windows(infos, window, max_windows, seed)
    acc = _Moments(infos[0].channels)
    keep = max(1, math.ceil(max_pixels / len(plan)))
    subsample: list[np.ndarray] = []
    rng = np.random.default_rng(seed + 1)
    with tqdm(total=len(plan), desc="band statistics", unit="window", disable=not progress) as bar:
        for f, group in groupby(plan, key=itemgetter(0)):
            with open_raster(infos[f].path) as ds:
                for _, win in group:
                    image, valid = read_window(ds, infos[f].bands, win, nodata)
                    x = image[valid].astype(np.float64) / scales[f]  # (valid pixels, channels)
                    bar.update(1)
                    if len(x):
                        acc.add(x)
                        subsample.append(
                            (x[rng.permutation(len(x))[:keep]] if len(x) > keep else x).astype(np.float32)
                        )
    n, mean, m2 = acc.n, acc.mean, acc.m2
    if n == 0:
        names = sorted({infos[f].path for f, _ in plan})
        raise DataError(f"no valid (non-nodata) pixel in the windows read from {', '.join(names[:5])}")
    pixels = np.concatenate(subsample)
    p2, p98 = np.percentile(pixels, [2, 98], axis=0)
    return BandStats(
        bands=list(bands) if bands else None,
        scale=scale_option,
        mean=mean.tolist(),
        std=np.sqrt(m2 / n).tolist(),
        p2=p2.tolist(),
        p98=p98.tolist(),
        pixels=int(n),
        files=len({f for f, _ in plan}),
        windows=len(plan),
    )
