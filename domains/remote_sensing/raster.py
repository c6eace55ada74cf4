"""Reading rasters with rasterio: any GDAL format, band selection, nodata / masks / alpha, windows.

Every read returns ``float32`` pixels ``H x W x C`` (band order as selected, file scale/offset applied) and a
boolean ``H x W`` valid mask: a pixel is valid when GDAL's mask (nodata value, internal mask or alpha band)
says so for every selected band and all its values are finite. A NaN or infinite value is missing data, like
nodata (:func:`read_pixels` also says which pixels were invalid only for that reason, so it can be reported).
Callers decide what to do with invalid pixels; nothing here fills them.

A raster may be a URL (``https://``, ``s3://``, read through GDAL's /vsicurl/ and /vsis3/ file systems) and a
data path may be a list file (``.txt``/``.csv``) of paths and URLs. Remote reads run under :func:`gdal_env`: GDAL
retries failed requests, does not list the "folder" of every file, and a stalled request times out; the user's
own GDAL/AWS environment variables win (e.g. ``AWS_S3_ENDPOINT``, ``AWS_HTTPS=NO``,
``AWS_VIRTUAL_HOSTING=FALSE`` for an S3-compatible server, ``AWS_NO_SIGN_REQUEST=YES`` for public buckets).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from foundation.data.listing import is_list_file, is_url, read_list, url_name
from foundation.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Suffixes picked up when a folder is given; a single file of any GDAL format can always be named directly.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
# Divisors that bring common integer encodings to reflectance-like units (Sentinel-2 L1C/L2A, Landsat
# surface reflectance products stored as integers use 10000).
DTYPE_SCALES = {"uint8": 255.0, "uint16": 10000.0, "int16": 10000.0}


# GDAL configuration for rasters read over the network (only options the environment does not set already).
REMOTE_GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the URL's "folder" per file
    "GDAL_HTTP_MAX_RETRY": "4",  # 429 / 5xx / dropped transfers
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_TIMEOUT": "60",  # a stalled request fails (then is retried) instead of hanging
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
}
REMOTE_HEADER_THREADS = 16  # URLs whose headers are read at once when a list is scanned
REMOTE_TRIES = 3  # our own attempts at opening a URL (each with GDAL's retries), the file reopened between


def is_remote(path: str | os.PathLike) -> bool:
    """A URL, or a GDAL virtual network path (``/vsicurl/``, ``/vsis3/``, ...)."""
    text = str(path)
    return is_url(text) or (text.startswith("/vsi") and not text.startswith(("/vsimem/", "/vsizip//")))


def raster_name(path: str | os.PathLike) -> str:
    """The file name of a raster path or URL (a URL's last path part, without its query)."""
    text = str(path)
    return url_name(text) if is_url(text) else Path(text).name


def raster_stem(path: str | os.PathLike) -> str:
    """:func:`raster_name` without its last suffix (``scene.tif`` -> ``scene``), for output names."""
    return Path(raster_name(path)).stem


def gdal_env(path: str | os.PathLike) -> contextlib.AbstractContextManager:
    """:data:`REMOTE_GDAL_OPTIONS` for a remote ``path`` (scoped, not written to ``os.environ``); nothing for a
    local one."""
    if not is_remote(path):
        return contextlib.nullcontext()
    return rasterio.Env(**{k: v for k, v in REMOTE_GDAL_OPTIONS.items() if k not in os.environ})


class UnreadableRasterError(DataError):
    """GDAL cannot open the file: in a folder it is skipped, given alone it stops the command."""


# What opening or reading a broken file raises (a truncated GeoTIFF opens, then fails mid-read).
READ_ERRORS = (RasterioError, DataError)


def read_error_text(error: BaseException) -> str:
    """GDAL's own words for a failed read: rasterio says "Read failed. See previous exception" and chains
    GDAL's message (which block, which decoder) as the cause."""
    cause = error.__cause__
    return str(cause) if isinstance(error, RasterioError) and cause is not None and str(cause) else str(error)


# GDAL's words for what asking again does not change: an HTTP 4xx but 408/429 (GDAL retries those itself),
# S3's own answers for a missing key or bucket and for refused credentials, a file that is no raster
_FINAL_ERRORS = re.compile(
    r"HTTP response code: 4(?!08|29)\d\d\b|The specified (key|bucket) does not exist|Access ?Denied"
    r"|InvalidAccessKeyId|SignatureDoesNotMatch|not recognized as (being in )?a supported"
    r"|configuration options not defined"  # no credentials: GDAL names the variables it read
)


def _is_final(message: str) -> bool:
    """A remote open that failed for a reason asking again does not change (matched on GDAL's message, not on
    a bare '404' that a URL or a port number can contain)."""
    return _FINAL_ERRORS.search(message) is not None


def open_dataset(path: str | Path) -> rasterio.io.DatasetReader:
    """``rasterio.open`` with an error naming the file when GDAL cannot read it; the caller closes it.

    Rasters without georeferencing are allowed (rasterio's warning is silenced here; :func:`inspect_raster`
    logs one of ours). A URL is tried :data:`REMOTE_TRIES` times (GDAL retries each request too).

    Raises:
        UnreadableRasterError: not a raster GDAL can open (or a URL unreachable after the retries).
    """
    tries = REMOTE_TRIES if is_remote(path) else 1
    for attempt in range(tries):
        try:
            with warnings.catch_warnings(), gdal_env(path):
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(path)
        except RasterioError as e:
            final = _is_final(str(e))
            if attempt + 1 < tries and not final:
                time.sleep(float(REMOTE_GDAL_OPTIONS["GDAL_HTTP_RETRY_DELAY"]) * 2**attempt)
                continue
            after = f" after {attempt + 1} tries" if attempt else ""
            if "configuration options not defined" in str(e):
                raise UnreadableRasterError(f"{path}: no credentials for the bucket ({e})") from e
            raise UnreadableRasterError(f"{path}: not a readable raster{after} ({e})") from e
    raise AssertionError("unreachable")


@contextlib.contextmanager
def open_raster(path: str | Path) -> Iterator[rasterio.io.DatasetReader]:
    """:func:`open_dataset` as a context manager."""
    ds = open_dataset(path)
    try:
        yield ds
    finally:
        ds.close()


@dataclass(frozen=True)
class RasterInfo:
    """What the sampler needs to know about one raster, read once from its header."""

    path: str
    width: int
    height: int
    bands: tuple[int, ...]  # 1-based, in the order they are read
    dtype: str
    crs: str | None
    colorinterp: tuple[str, ...]  # of the selected bands
    scaled: bool  # the file declares a scale or offset, applied on read

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def is_rgb(self) -> bool:
        return self.colorinterp == ("red", "green", "blue")


def inspect_raster(path: str | Path, bands: Sequence[int] | None = None) -> RasterInfo:
    """Header facts of ``path`` with ``bands`` checked against its band count.

    Without ``bands``, every band except alpha bands is used (alpha is a mask, not data).

    Raises:
        DataError: unreadable file, or a selected band it does not have.
    """
    with open_raster(path) as ds:
        interp = tuple(ci.name for ci in ds.colorinterp)
        if bands is None:
            bands = tuple(i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha)
            if not bands:
                raise DataError(f"{path}: has only alpha bands, no data bands")
        bad = [b for b in bands if b > ds.count]
        if bad:
            raise DataError(
                f"{path}: has {ds.count} bands, cannot select band(s) {bad}; "
                f"set data.options.bands to numbers in 1..{ds.count}"
            )
        if ds.crs is None:
            log.warning("%s: no CRS; reading it in pixel space", path)
        scaled = any(ds.scales[b - 1] != 1 or ds.offsets[b - 1] != 0 for b in bands)
        return RasterInfo(
            path=str(path),
            width=ds.width,
            height=ds.height,
            bands=tuple(bands),
            dtype=ds.dtypes[bands[0] - 1],
            crs=ds.crs.to_string() if ds.crs else None,
            colorinterp=tuple(interp[b - 1] for b in bands),
            scaled=scaled,
        )


def value_scale(info: RasterInfo, scale: object = "auto") -> float:
    """The divisor to reflectance-like units: ``scale`` if a number, else derived from the dtype.

    ``auto``: uint8 -> 255, (u)int16 -> 10000, anything else (floats, files with their own scale/offset) -> 1.

    Raises:
        ConfigError: ``scale`` is neither ``auto`` nor a positive number.
    """
    if scale is None or scale == "auto":
        return 1.0 if info.scaled else DTYPE_SCALES.get(info.dtype, 1.0)
    try:
        value = float(scale)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.options.scale={scale!r}: expected 'auto' or a positive number") from e
    if not value > 0:
        raise ConfigError(f"data.options.scale={scale!r}: expected 'auto' or a positive number")
    return value


class Pixels(NamedTuple):
    """One window read: values ``H x W x C`` float32, the ``H x W`` valid mask, and the ``H x W`` mask of
    pixels GDAL calls valid that hold a NaN or infinite value (counted as invalid too)."""

    values: np.ndarray
    valid: np.ndarray
    nonfinite: np.ndarray


def read_pixels(
    ds: rasterio.io.DatasetReader,
    bands: Sequence[int],
    window: Window | None = None,
    nodata: float | None = None,
) -> Pixels:
    """Pixels of ``window`` (whole raster if None), their valid mask and where values are not finite.

    Args:
        ds: an open dataset.
        bands: 1-based band indexes.
        window: the region; must lie inside the raster.
        nodata: an extra nodata value (raw units) for files that do not declare theirs.
    """
    bands = list(bands)
    with gdal_env(ds.name):
        raw = ds.read(bands, window=window, out_dtype="float32")
        declared = (ds.read_masks(bands, window=window) > 0).all(axis=0)
    if nodata is not None:
        declared &= ~(raw == np.float32(nodata)).any(axis=0)
    scales = np.array([ds.scales[b - 1] for b in bands], dtype=np.float32)
    offsets = np.array([ds.offsets[b - 1] for b in bands], dtype=np.float32)
    if (scales != 1).any() or (offsets != 0).any():
        raw = raw * scales[:, None, None] + offsets[:, None, None]
    nonfinite = declared & ~np.isfinite(raw).all(axis=0)
    return Pixels(np.ascontiguousarray(raw.transpose(1, 2, 0)), declared & ~nonfinite, nonfinite)


def read_window(
    ds: rasterio.io.DatasetReader,
    bands: Sequence[int],
    window: Window | None = None,
    nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``H x W x C`` float32 and a valid mask ``H x W`` for ``window`` (see :func:`read_pixels`)."""
    pixels = read_pixels(ds, bands, window, nodata)
    return pixels.values, pixels.valid


def list_rasters(path: str | Path) -> list[Path]:
    """A single raster file or URL, every file with a raster suffix under a folder (recursive, sorted), or the
    entries of a list file (``.txt``/``.csv``; URLs stay strings, relative paths resolve against its folder).

    Raises:
        DataError: the path does not exist, a folder holds no rasters, or a list file names none.
    """
    if is_url(path):
        return [str(path)]  # type: ignore[list-item]  # Path() would fold "https://" to "https:/"
    if is_list_file(path):
        return [e if is_url(e) else Path(e) for e in read_list(path)]  # type: ignore[misc]
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"data folder {str(path)!r} has no rasters ({', '.join(RASTER_SUFFIXES)})")
    return files


def _inspect_all(
    files: Sequence[str | Path], bands: Sequence[int] | None
) -> Iterator[RasterInfo | UnreadableRasterError]:
    """:func:`inspect_raster` of each file, in order; an unreadable one gives its error. URLs are looked at
    :data:`REMOTE_HEADER_THREADS` at a time (a header is a round trip: 10,000 scenes one by one take minutes)."""

    def inspect(f: str | Path) -> RasterInfo | UnreadableRasterError:
        try:
            return inspect_raster(f, bands)
        except UnreadableRasterError as e:
            return e

    if sum(1 for f in files if is_remote(f)) < 2:
        return map(inspect, files)
    pool = ThreadPoolExecutor(REMOTE_HEADER_THREADS, thread_name_prefix="raster-headers")

    def ordered() -> Iterator[RasterInfo | UnreadableRasterError]:
        try:
            yield from pool.map(inspect, files)  # another error (a band the file lacks) is raised in order
        finally:  # stopped early by such an error: the headers not read yet are not waited for
            pool.shutdown(wait=False, cancel_futures=True)

    return ordered()


def find_rasters(
    path: str | Path, bands: Sequence[int] | None = None
) -> tuple[list[RasterInfo], list[dict[str, str]]]:
    """:func:`scan_rasters`, also returning the files skipped (``{"file", "reason"}``) for a batch report."""
    files = list_rasters(path)
    infos: list[RasterInfo] = []
    skipped: list[dict[str, str]] = []
    for f, info in zip(files, _inspect_all(files, bands), strict=True):
        if isinstance(info, UnreadableRasterError):
            if len(files) == 1:
                raise info
            log.warning("skipping %s", info)
            skipped.append({"file": str(f), "reason": str(info)})
            continue
        if infos and info.channels != infos[0].channels:
            raise DataError(
                f"{f}: gives {info.channels} bands, but {infos[0].path} gives {infos[0].channels}; every raster "
                "must have the same bands (select common ones with data.options.bands, e.g. bands=4,3,2)"
            )
        infos.append(info)
    if not infos:
        names = ", ".join(s["file"] for s in skipped)
        raise DataError(f"no readable raster under {str(path)!r} (skipped: {names})")
    if skipped:
        log.warning("%d unreadable file(s) skipped under %s", len(skipped), path)
    return infos, skipped


def scan_rasters(path: str | Path, bands: Sequence[int] | None = None) -> list[RasterInfo]:
    """Inspect every raster under ``path``; all must give the same number of channels.

    In a folder, unreadable files are named in the log and skipped (a few broken files do not stop a run);
    a single file that cannot be read is an error.

    Raises:
        DataError: nothing readable, a band missing from a file, or a file whose channel count differs from
            the first file's (named, with both counts).
    """
    return find_rasters(path, bands)[0]
