"""Map output: a temporary strip-written GeoTIFF turned into a verified Cloud-Optimized GeoTIFF, atomically.

Rows arrive in order from the blender and go to an uncompressed, striped float32 GeoTIFF (appending whole rows
needs no read-modify-write, so memory stays flat). GDAL's ``COG`` driver then writes the final layout
(512-px tiles, DEFLATE with the floating-point predictor, internal overviews averaged with NaN as nodata)
under a temporary name; ``rio_cogeo.cogeo.cog_validate`` checks the layout and every block of the full
resolution and of each overview is decoded again, because a file cut short by a full disk passes the
validator (it reads headers only). Only then is it renamed to the requested name
(shared/reference/remote_sensing.md, "Output"; :func:`foundation.outputs.write_verified`). A failure anywhere
leaves no file under the final name and one :class:`~foundation.errors.OutputError` naming it and the reason
("no space left on device" for a full disk, whatever GDAL called it).

Maps and quicklooks carry a mark of ours (GeoTIFF tags, a PNG text chunk), so ``--overwrite`` replaces only
files this command wrote.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from foundation.outputs import output_error, write_verified

MAP_KIND = "canopy-height"  # the "model" tag of our maps and the text of our quicklooks
QUICKLOOK_KEY = "foundation"  # PNG text chunk key marking a quicklook of ours
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


def block_size(height: int, width: int) -> int:
    """512 where the image allows it; 256 for images smaller than 512 px on both sides."""
    return COG_BLOCK if max(height, width) >= COG_BLOCK else COG_BLOCK // 2


RowWriter = Callable[[int, np.ndarray], None]  # write(row0, rows h x W float32)


@contextlib.contextmanager
def strip_writer(
    path: Path,
    *,
    height: int,
    width: int,
    crs: Any,
    transform: Any,
    tags: dict[str, str] | None = None,
    name: Path | None = None,
) -> Iterator[RowWriter]:
    """Yields ``write(row0, rows)`` into an uncompressed striped float32 GeoTIFF with NaN nodata.

    Raises:
        OutputError: creating, writing or closing the file failed (e.g. a full disk); names ``name``
            (the final output; default ``path``) and the reason.
    """
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
    name = name or path
    with _writing(name), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        dst = rasterio.open(path, "w", **profile)
        dst.update_tags(**(tags or {}))
        dst.set_band_description(1, "canopy height (m)")
        dst.units = ("m",)

    def write(row0: int, rows: np.ndarray) -> None:
        with _writing(name):
            dst.write(rows[None], window=Window(0, row0, width, rows.shape[0]))

    try:
        yield write
    except BaseException:
        with contextlib.suppress(Exception):
            dst.close()
        raise
    with _writing(name):
        dst.close()


@contextlib.contextmanager
def _writing(name: Path) -> Iterator[None]:
    """GDAL's write failures (RasterioIOError, CPLE_* errors, even SystemError) as one OutputError naming
    ``name`` and the reason."""
    try:
        yield
    except Exception as e:
        raise output_error(e, name) from e


def write_cog(src: Path, dst: Path, *, overwrite: bool = False) -> Path:
    """Translate ``src`` (a finished GeoTIFF) to a verified COG at ``dst``, atomically; ``src`` is kept.

    Raises:
        OutputError: ``dst`` exists and ``overwrite`` is False, GDAL fails, the disk is full, or the result
            is not a valid, fully readable COG (nothing is left under ``dst``'s name or a temporary one).
    """

    def translate(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(src) as ds:
                blocks = block_size(ds.height, ds.width)
            rasterio.shutil.copy(src, tmp, driver="COG", BLOCKSIZE=str(blocks), **COG_OPTIONS)

    return write_verified(dst, translate, verify_cog, overwrite=overwrite)


def verify_cog(path: Path) -> None:
    """A valid COG layout whose every block decodes, at full resolution and in each overview.

    Raises:
        ValueError: not a valid COG, or a block that cannot be read (the message says which).
    """
    valid, errors, _ = validate_cog(path)
    if not valid:
        raise ValueError(f"not a valid Cloud-Optimized GeoTIFF: {'; '.join(errors)}")
    with _quiet_open(path) as ds:
        levels = len(ds.overviews(1))
    for level in (None, *range(levels)):
        with _quiet_open(path, overview_level=level) as ds:
            for _, window in ds.block_windows(1):
                try:
                    ds.read(1, window=window)
                except rasterio.errors.RasterioError as e:
                    where = "full resolution" if level is None else f"overview {level + 1}"
                    rows = f"{window.row_off}-{window.row_off + window.height}"
                    raise ValueError(f"read back failed at {where}, rows {rows}: {e}") from e


def _quiet_open(path: Path, **kw: Any) -> rasterio.io.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, **{k: v for k, v in kw.items() if v is not None})


def validate_cog(path: Path) -> tuple[bool, list[str], list[str]]:
    """``rio_cogeo``'s validator: (is_valid, errors, warnings)."""
    from rio_cogeo.cogeo import cog_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return cog_validate(str(path), quiet=True)


def map_tags(path: Path) -> dict[str, str] | None:
    """The tags of an existing map of ours (``model``, ``source``, ``fingerprint``...); None for any other
    file."""
    try:
        with _quiet_open(path) as ds:
            tags = ds.tags()
    except (rasterio.errors.RasterioError, OSError):
        return None
    return tags if tags.get("model") == MAP_KIND else None


def is_our_quicklook(path: Path) -> bool:
    """A PNG this command wrote (it carries our text chunk)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(QUICKLOOK_KEY) == MAP_KIND
    except (OSError, UnidentifiedImageError):
        return False


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
    """A colour PNG of the map (read from the COG's overviews), at most ``max_side`` px, verified, atomically.

    Raises:
        OutputError: the PNG cannot be written (names it and the reason).
    """
    from PIL import Image, PngImagePlugin

    with _quiet_open(cog) as ds:
        f = max(1.0, max(ds.height, ds.width) / max_side)
        shape = (max(1, round(ds.height / f)), max(1, round(ds.width / f)))
        heights = ds.read(1, out_shape=shape, resampling=Resampling.average, masked=False)
    text = PngImagePlugin.PngInfo()
    text.add_text(QUICKLOOK_KEY, MAP_KIND)

    def save(tmp: Path) -> None:
        Image.fromarray(colorize(heights, max_height), mode="RGBA").save(tmp, format="PNG", pnginfo=text)

    def verify(tmp: Path) -> None:
        with Image.open(tmp) as im:
            im.load()

    return write_verified(png, save, verify)
