"""Slides by URL (``https://``, ``s3://``, any fsspec protocol): byte ranges through fsspec, the pyramid
through tiffslide (https://github.com/Bayer-Group/tiffslide), for the TIFF-based formats it reads.

OpenSlide needs a local file, so it stays the reader of local slides; a URL is never downloaded whole. Every
network read is retried (a dropped connection, a timeout) with a growing pause, then given up with one
:class:`DataError` naming the URL, which the stream and ``embed`` treat like any broken slide: skipped and
reported. Credentials and endpoints come from the usual places of each protocol (for S3: the ``AWS_*``
environment variables, ``~/.aws``; ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from foundation.errors import DataError, MissingDependencyError
from foundation_domains.pathology.slide_refs import slide_key_text
from foundation_domains.pathology.tiffread import _ome_physical_size, composite_on_white

log = logging.getLogger(__name__)

# The TIFF-based formats tiffslide reads (Aperio, Leica, Ventana, Hamamatsu NDPI, generic / OME pyramids).
REMOTE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
BLOCK_SIZE = 1 << 20  # bytes per range request: a few tiles, not a whole level
# an http(s) transfer silent this long fails (and is retried); aiohttp's own limit is 300 s for a whole request
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 20.0, 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` attempts per network read, pausing ``delay_s``, then twice that, ... in between."""

    tries: int = 4
    delay_s: float = 0.5


DEFAULT_RETRY = RetryPolicy()


def _tiffslide() -> Any:
    try:
        import fsspec  # noqa: F401
        import tiffslide
    except ImportError as e:
        raise MissingDependencyError(
            f"slides by URL are read with fsspec and tiffslide ({e.name} is missing): "
            'pip install "foundation[remote]"'
        ) from e
    return tiffslide


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a network read raises when asking again may help: connection cut or refused, timeouts (OSError
    covers those of fsspec and s3fs), aiohttp's and botocore's own."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors.append(botocore.exceptions.BotoCoreError)
    return tuple(errors)


def _http_status(error: BaseException) -> int | None:
    """The HTTP status behind ``error`` (aiohttp's, possibly under fsspec's FileNotFoundError), or None."""
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(seen, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
        seen = seen.__cause__
    return None


def _is_transient(error: BaseException, transient: tuple[type[BaseException], ...]) -> bool:
    """Whether asking again may help. fsspec's HTTP file system answers FileNotFoundError for ANY failed
    look-up (a refused connection, a 503), with the real error as its cause; a 4xx other than 408/429 is final."""
    status = _http_status(error)
    if status is not None:
        return status in (408, 429) or status >= 500
    if isinstance(error, (FileNotFoundError, PermissionError)):
        cause = error.__cause__
        return cause is not None and _is_transient(cause, transient)
    return isinstance(error, transient)


def retrying(url: str, what: str, action: Callable[[], T], retry: RetryPolicy | None = None) -> T:
    """``action()``, retried when the network failed; the last error becomes a DataError naming ``url``.

    Raises:
        DataError: a 404 or 403 (another 4xx but 408/429), or bytes that are no slide (a decoder's error), at
            once; a network error (refused or cut connection, timeout, 5xx) after ``retry.tries`` attempts.
    """
    retry = retry or DEFAULT_RETRY
    transient = transient_errors()
    error: Exception | None = None
    for attempt in range(retry.tries):
        if attempt:
            time.sleep(retry.delay_s * 2 ** (attempt - 1))
        try:
            return action()
        except DataError:
            raise
        except Exception as e:
            if _no_credentials(e):  # asking again will not find them
                raise DataError(f"{url}: {NO_CREDENTIALS}") from e
            if _is_transient(e, transient):
                error = e
                log.debug("%s: %s failed (try %d of %d): %s", url, what, attempt + 1, retry.tries, e)
                continue
            status = _http_status(e)
            if isinstance(e, PermissionError) or status in (401, 403):
                raise DataError(f"{url}: access denied ({_reason(e)}); check the credentials") from e
            if isinstance(e, FileNotFoundError) or status in (404, 410):  # asking again will not help
                raise DataError(f"{url}: not found ({_reason(e)})") from e
            if status is not None:
                raise DataError(f"{url}: {what} failed: the server answered HTTP {status}") from e
            # tifffile, zarr, imagecodecs: the bytes came and are not a slide we read
            raise DataError(
                f"{url}: {what} failed: not a slide tiffslide reads ({type(e).__name__}: {e})"
            ) from e
    shown = error.__cause__ if isinstance(error, FileNotFoundError) and error.__cause__ else error  # fsspec's
    raise DataError(
        f"{url}: {what} failed after {retry.tries} tries ({type(shown).__name__}: {shown})"
    ) from error


NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
    "temporary ones), or AWS_PROFILE with ~/.aws/credentials; AWS_ENDPOINT_URL for an S3-compatible server"
)


def _no_credentials(error: BaseException) -> bool:
    """botocore found no credentials to sign with (it says so before any request is sent)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return False
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (NoCredentialsError, PartialCredentialsError)):
            return True
        seen = seen.__cause__
    return False


def _reason(error: BaseException) -> str:
    status = _http_status(error)
    return f"HTTP {status}" if status is not None else str(error)


def remote_identity(url: str) -> dict[str, Any]:
    """Which slide a feature file was made from, for a URL: the URL (an http(s) one without its query: a
    re-signed URL is the same slide) and its size (one HEAD / stat request).

    Raises:
        DataError: unreachable after the retries, or not found.
    """
    _tiffslide()

    def info() -> dict[str, Any]:
        fs, path = url_to_fs(url)
        return fs.info(path)

    found = retrying(url, "looking it up", info)
    return {"slide": slide_key_text(url), "slide_bytes": int(found.get("size") or 0), "slide_mtime_ns": 0}


def url_to_fs(url: str) -> tuple[Any, str]:
    """fsspec's file system and path for ``url``; http(s) with connect and read timeouts (as GDAL's for
    rasters), so a server that stops sending fails in a minute, not after 5 minutes a try."""
    import fsspec

    options: dict[str, Any] = {}
    if url.lower().startswith(("https://", "http://")):
        import aiohttp
        from fsspec.config import conf

        # the user's fsspec configuration (headers, proxies) stays: ours would replace its client_kwargs whole
        client = dict(conf.get(url.split("://", 1)[0].lower(), {}).get("client_kwargs") or {})
        client.setdefault(
            "timeout",
            aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S),
        )
        options["client_kwargs"] = client
    return fsspec.core.url_to_fs(url, **options)


def check_remote_format(url: str) -> None:
    """Refuse a URL whose suffix names a format tiffslide does not read, before any request.

    Raises:
        DataError: e.g. ``.mrxs`` (many files) or ``.vms``; the message says to copy it to a local disk.
    """
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    if not name.endswith(REMOTE_SUFFIXES):
        raise DataError(
            f"{url}: slides by URL are read with tiffslide, which reads {', '.join(REMOTE_SUFFIXES)} files; "
            "copy this one to a local disk (OpenSlide reads it there)"
        )


def _properties(raw: dict[str, Any]) -> dict[str, str]:
    """tiffslide's properties as strings, with what our resolution chain (``slide.find_mpp``) looks for."""
    props = {k: str(v) for k, v in raw.items() if v is not None and not k.startswith("tiffslide.level[")}
    if "tiff.ResolutionUnit" in props:  # tiffslide says CENTIMETER, OpenSlide centimeter
        props["tiff.ResolutionUnit"] = props["tiff.ResolutionUnit"].lower()
    description = props.get("tiff.ImageDescription", "")
    if description.lstrip().startswith("<?xml") or "<OME" in description[:512]:
        size = _ome_physical_size(description)
        if size is not None:
            props["ome.PhysicalSizeX"], props["ome.PhysicalSizeXUnit"] = size
            # tiffslide's mpp of an OME-TIFF is its TIFF resolution tags'; read locally, the OME size comes
            # first (the tags, often a writer's default, only after it)
            props.pop("tiffslide.mpp-x", None)
            props.pop("tiffslide.mpp-y", None)
    return props


class RemoteSlideReader:
    """One slide at a URL, read region by region (OpenSlide's ``read_region`` convention, white outside)."""

    backend = "tiffslide"

    def __init__(self, url: str, retry: RetryPolicy | None = None) -> None:
        """Raises: DataError: unreachable after the retries, or not a slide tiffslide reads."""
        self.url = url
        self.retry = retry or DEFAULT_RETRY
        check_remote_format(url)
        self._tiffslide = _tiffslide()
        self._slide = self._retrying("open", self._open)
        try:
            self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
            self.properties = _properties(dict(self._slide.properties))
        except Exception as e:  # tiffslide parses lazily: a TIFF it cannot lay out fails here
            self.close()
            raise DataError(f"{url}: tiffslide cannot read it as a slide ({type(e).__name__}: {e})") from e
        self._axes = self._slide.properties.get("tiffslide.series-axes")

    def _open(self) -> Any:
        fs, path = url_to_fs(self.url)
        handle = fs.open(path, "rb", block_size=BLOCK_SIZE)
        try:
            slide = self._tiffslide.TiffSlide(handle)
            _ = slide.properties  # reads the header now, inside the retries
        except BaseException:
            handle.close()
            raise
        self._handle = handle  # tiffslide does not close a file object it was given
        return slide

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        return retrying(self.url, what, action, self.retry)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``size[1] x size[0] x 3`` uint8; outside the image reads as white glass (tiffslide pads black)."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        rx, ry = int(location[0] / ds), int(location[1] / ds)  # tiffslide's (and OpenSlide's) rounding
        w, h = int(size[0]), int(size[1])
        x0, y0, x1, y1 = max(rx, 0), max(ry, 0), min(rx + w, lw), min(ry + h, lh)
        if x0 >= x1 or y0 >= y1:
            return np.full((h, w, 3), 255, np.uint8)
        loc = (int(location[0]), int(location[1]))
        region = self._retrying(
            f"reading level {level} at {loc}",
            lambda: np.asarray(self._slide.read_region(loc, level, (w, h), as_array=True)),
        )
        if region.ndim == 2:
            region = region[..., None]
        if region.dtype != np.uint8 or region.shape[:2] != (h, w) or region.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"{self.url}: level {level} gave {region.dtype} pixels of shape {region.shape} "
                "(only 8-bit RGB/grey slides are read)"
            )
        if region.shape[-1] == 1:
            region = np.repeat(region, 3, axis=-1)
        elif region.shape[-1] == 4:
            region = composite_on_white(np.ascontiguousarray(region))
        if (x0, y0, x1, y1) != (rx, ry, rx + w, ry + h):  # padded: glass, not black
            out = np.full((h, w, 3), 255, np.uint8)
            out[y0 - ry : y1 - ry, x0 - rx : x1 - rx] = region[y0 - ry : y1 - ry, x0 - rx : x1 - rx]
            return out
        return region

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
            self._handle = None
