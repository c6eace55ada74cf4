"""Map output: a temporary strip-written GeoTIFF turned into a validated Cloud-Optimized GeoTIFF, atomically.

Rows arrive in order from the blender and go to an uncompressed, striped float32 GeoTIFF (appending whole rows
needs no read-modify-write, so memory stays flat). GDAL's ``COG`` driver then writes the final layout
(512-px tiles, DEFLATE with the floating-point predictor, internal overviews averaged with NaN as nodata),
``rio_cogeo.cogeo.cog_validate`` checks it, and only a valid file is renamed to the requested name
(shared/reference/remote_sensing.md, "Output"). A failure anywhere leaves no file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from foundation.errors import DataError

COG_BLOCK = 512
COG_OPTIONS = {
    "COMPRESS": "DEFLATE",
    "PREDICTOR": "FLOATING_POINT",  # TIFF predictor 3: far smaller float rasters
    "LEVEL": "6",
    "OVERVIEWS": "AUTO",
    "OVERVIEW_RESAMPLING": "AVERAGE",
    "RESAMPLING": "AVERAGE",
    "BIGTIFF": "IF_SAFER",
    "NUM_THREADS": "ALL_CPUS",
}
# Colour stops of the quicklook ramp (0 m -> max height): bare ground tan, through green, to tall forest.
RAMP = np.array(
    [[222, 206, 170], [199, 224, 140], [120, 198, 121], [49, 163, 84], [0, 104, 55], [0, 60, 40]],
    dtype=np.float32,
)


def temp_name(path: Path, tag: str) -> Path:
    """A hidden sibling of ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.stem}.{tag}{os.getpid()}{path.suffix}")


def block_size(height: int, width: int) -> int:
    """512 where the image allows it; 256 for images smaller than 512 px on both sides."""
    return COG_BLOCK if max(height, width) >= COG_BLOCK else COG_BLOCK // 2


@contextlib.contextmanager
def strip_writer(
    path: Path, *, height: int, width: int, crs: Any, transform: Any, tags: dict[str, str] | None = None
) -> Iterator[rasterio.io.DatasetWriter]:
    """An uncompressed striped float32 GeoTIFF with NaN nodata, for rows written in order."""
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "float32",
        "nodata": float("nan"),
        "tiled": False,
        "compress": "none",
        "BIGTIFF": "IF_SAFER",
    }
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    elif transform is not None and not transform.is_identity:
        profile.update(transform=transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.update_tags(**(tags or {}))
            dst.set_band_description(1, "canopy height (m)")
            dst.units = ("m",)
            yield dst


def write_cog(src: Path, dst: Path, *, overwrite: bool = False) -> Path:
    """Translate ``src`` (a finished GeoTIFF) to a validated COG at ``dst``, atomically; ``src`` is kept.

    Raises:
        DataError: ``dst`` exists and ``overwrite`` is False, GDAL fails, or the result is not a valid COG.
    """
    if dst.exists() and not overwrite:
        raise DataError(f"{dst} exists; pass --overwrite to replace it")
    tmp = temp_name(dst, "cog")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(src) as ds:
                blocks = block_size(ds.height, ds.width)
            rasterio.shutil.copy(src, tmp, driver="COG", BLOCKSIZE=str(blocks), **COG_OPTIONS)
        valid, errors, _ = validate_cog(tmp)
        if not valid:
            raise DataError(f"{dst}: the written file is not a valid Cloud-Optimized GeoTIFF: {errors}")
        os.replace(tmp, dst)
    except RasterioError as e:
        raise DataError(f"{dst}: writing the Cloud-Optimized GeoTIFF failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def validate_cog(path: Path) -> tuple[bool, list[str], list[str]]:
    """``rio_cogeo``'s validator: (is_valid, errors, warnings)."""
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return cog_validate(str(path), quiet=True)


def colorize(heights: np.ndarray, max_height: float) -> np.ndarray:
    """``H x W`` metres -> ``H x W x 4`` uint8 RGBA along :data:`RAMP`; NaN transparent."""
    valid = np.isfinite(heights)
    t = np.clip(np.where(valid, heights, 0) / max(max_height, 1e-6), 0, 1) * (len(RAMP) - 1)
    i = np.minimum(t.astype(np.int64), len(RAMP) - 2)
    f = (t - i)[..., None]
    rgb = RAMP[i] * (1 - f) + RAMP[i + 1] * f
    alpha = np.where(valid, 255, 0)[..., None]
    return np.concatenate([rgb, alpha], axis=-1).round().astype(np.uint8)


def write_quicklook(cog: Path, png: Path, *, max_height: float, max_side: int = 1024) -> Path:
    """A colour PNG of the map (read from the COG's overviews), at most ``max_side`` px, atomically."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(cog) as ds:
            f = max(1.0, max(ds.height, ds.width) / max_side)
            shape = (max(1, round(ds.height / f)), max(1, round(ds.width / f)))
            heights = ds.read(1, out_shape=shape, resampling=Resampling.average, masked=False)
    tmp = temp_name(png, "part")
    try:
        Image.fromarray(colorize(heights, max_height), mode="RGBA").save(tmp, format="PNG")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png
