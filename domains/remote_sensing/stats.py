"""Per-band statistics over whole scenes or datasets, streamed window by window in bounded memory.

Statistics are computed once for the data (never per tile, so tiles agree; shared/reference/remote_sensing.md)
in the units the model sees before normalisation (pixel values divided by the ``scale`` option), with
invalid pixels (nodata, masked, NaN or infinite) excluded. Mean and standard deviation are exact for the
windows read (Chan et al.'s pairwise update in float64); the 2nd/98th percentiles come from a bounded random
subsample of valid pixels, exact when all valid pixels fit in it.

A file that fails mid-read (a truncated GeoTIFF opens, then a block cannot be decoded) or has no valid pixel
in the windows read is skipped, named with its reason, and contributes nothing; the others go on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from operator import itemgetter
from pathlib import Path

import numpy as np
from rasterio.windows import Window
from tqdm import tqdm

from foundation.errors import DataError
from foundation_domains.remote_sensing.json_outputs import MARKER_KEY, check_json_output, write_json_output
from foundation_domains.remote_sensing.raster import (
    READ_ERRORS,
    RasterInfo,
    open_raster,
    read_error_text,
    read_pixels,
)

log = logging.getLogger(__name__)

STATS_VERSION = 1
STATS_KIND = "band-statistics"  # the marker of our statistics files (the only files `stats --out` replaces)
STATS_KEYS = ("version", "mean", "std", "p2", "p98", "pixels", "files", "windows")  # ours before the marker
UNREADABLE = "unreadable"  # kinds of skipped files: a read failed ...
EMPTY = "empty"  # ... or no valid pixel in the windows read


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
    files: int  # files that contributed
    windows: int
    nonfinite: float = 0.0  # fraction of the pixels read that held NaN or infinite values (left out)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason", "kind"}

    def save(self, path: str | Path, inputs: Sequence[Path] = ()) -> Path:
        """Write JSON atomically and read it back before it replaces ``path``, which may only be absent or an
        earlier statistics file of ours (see :func:`check_stats_output`).

        Raises:
            OutputError: ``path`` is refused, or cannot be written (the message names it and the reason).
        """
        check_stats_output(Path(path), inputs)  # again: the file may have appeared while we computed
        data = {"version": STATS_VERSION, **asdict(self)}
        return write_json_output(Path(path), STATS_KIND, data, BandStats.load)

    @classmethod
    def load(cls, path: str | Path) -> BandStats:
        """Raises: DataError: missing file, not JSON, or fields missing / of unequal lengths."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            data.pop("version", None)
            data.pop(MARKER_KEY, None)
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


def check_stats_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``out`` that is or would replace one of ``inputs`` (list the files of a folder, not only the
    folder), or an existing file that is not a statistics file of ours.

    Raises:
        OutputError: naming ``out`` and why it was left alone.
    """
    check_json_output(out, STATS_KIND, inputs, legacy_keys=STATS_KEYS)


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
        other = _Moments(x.shape[1])
        other.n, other.mean = len(x), x.mean(axis=0)
        other.m2 = ((x - other.mean) ** 2).sum(axis=0)
        self.merge(other)

    def merge(self, other: _Moments) -> None:
        if other.n == 0:
            return
        delta = other.mean - self.mean
        total = self.n + other.n
        self.mean = self.mean + delta * other.n / total
        self.m2 = self.m2 + other.m2 + delta**2 * self.n * other.n / total
        self.n = total


@dataclass
class _FileStats:
    """What the windows of one file gave; merged into the total only once the file was read to the end."""

    moments: _Moments
    subsample: list[np.ndarray] = field(default_factory=list)
    pixels_read: int = 0
    nonfinite: int = 0


def _file_stats(
    info: RasterInfo,
    windows: Sequence[Window],
    scale: float,
    nodata: float | None,
    keep: int,
    rng: np.random.Generator,
    bar: tqdm,
) -> _FileStats:
    """Moments and a pixel subsample of the valid pixels of ``windows`` of one file.

    Raises:
        DataError, RasterioError: the file cannot be opened or a window cannot be read.
    """
    acc = _FileStats(_Moments(info.channels))
    with open_raster(info.path) as ds:
        for win in windows:
            pixels = read_pixels(ds, info.bands, win, nodata)
            x = pixels.values[pixels.valid].astype(np.float64) / scale  # (valid pixels, channels)
            acc.pixels_read += pixels.valid.size
            acc.nonfinite += int(pixels.nonfinite.sum())
            bar.update(1)
            if len(x):
                acc.moments.add(x)
                acc.subsample.append(
                    (x[rng.permutation(len(x))[:keep]] if len(x) > keep else x).astype(np.float32)
                )
    return acc


def _skip(skipped: list[dict[str, str]], path: str, reason: str, kind: str) -> None:
    log.warning("skipping %s: %s", path, reason)
    skipped.append({"file": path, "reason": reason, "kind": kind})


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

    Returns:
        The statistics; ``skipped`` names the files left out (a read failed, or no valid pixel was read).

    Raises:
        DataError: no file gave a valid pixel (each one named with its reason).
    """
    plan = plan_windows(infos, window, max_windows, seed)
    total = _Moments(infos[0].channels)
    keep = max(1, math.ceil(max_pixels / len(plan)))
    subsample: list[np.ndarray] = []
    rng = np.random.default_rng(seed + 1)
    skipped: list[dict[str, str]] = []
    used, pixels_read, nonfinite = 0, 0, 0
    with tqdm(total=len(plan), desc="band statistics", unit="window", disable=not progress) as bar:
        for f, group in groupby(plan, key=itemgetter(0)):
            info, windows = infos[f], [w for _, w in group]
            try:
                part = _file_stats(info, windows, scales[f], nodata, keep, rng, bar)
            except READ_ERRORS as e:
                _skip(skipped, info.path, f"read error: {read_error_text(e)}", UNREADABLE)
                continue
            pixels_read += part.pixels_read
            nonfinite += part.nonfinite
            if part.nonfinite:
                log.warning(
                    "%s: %.1f%% of the pixels read are NaN or infinite; left out, like nodata",
                    info.path, 100 * part.nonfinite / part.pixels_read,
                )  # fmt: skip
            if part.moments.n == 0:
                what = "NaN or infinite" if part.nonfinite == part.pixels_read else "nodata, NaN or infinite"
                _skip(
                    skipped, info.path, f"every pixel of the {len(windows)} window(s) read is {what}", EMPTY
                )
                continue
            total.merge(part.moments)
            subsample.extend(part.subsample)
            used += 1
    if total.n == 0:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
        raise DataError(f"no valid (non-nodata) pixel in the windows read ({reasons})")
    pixels = np.concatenate(subsample)
    p2, p98 = np.percentile(pixels, [2, 98], axis=0)
    return BandStats(
        bands=list(bands) if bands else None,
        scale=scale_option,
        mean=total.mean.tolist(),
        std=np.sqrt(total.m2 / total.n).tolist(),
        p2=p2.tolist(),
        p98=p98.tolist(),
        pixels=int(total.n),
        files=used,
        windows=len(plan),
        nonfinite=round(nonfinite / max(pixels_read, 1), 6),
        skipped=skipped,
    )
