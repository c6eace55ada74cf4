"""Helpers that write rasters with rasterio for the remote_sensing tests (any bands, dtype, CRS, nodata)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

WriteRaster = Callable[..., Path]


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    nodata: float | None = None,
    res: float = 10.0,
    **profile,
) -> Path:
    """Write ``data`` (bands x H x W) as a GeoTIFF; ``crs=None`` writes no georeferencing at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = data.shape
    geo = (
        {"crs": CRS.from_string(crs), "transform": Affine(res, 0, 300_000, 0, -res, 5_000_000)} if crs else {}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver=profile.pop("driver", "GTiff"),
            width=width,
            height=height,
            count=count,
            dtype=data.dtype,
            nodata=nodata,
            **geo,
            **profile,
        ) as dst:
            dst.write(data)
    return path


def random_bands(count: int, height: int, width: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Random values in the usual range of ``dtype`` (reflectance x 10000 for 16-bit integers), never 0."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(1, 256, (count, height, width), dtype=np.uint8)
    if dtype in ("uint16", "int16"):
        return rng.integers(1, 6000, (count, height, width)).astype(dtype)
    return rng.uniform(0.01, 0.6, (count, height, width)).astype(dtype)
