"""Whole-slide images: one :class:`Slide` over OpenSlide and a tifffile fallback, with a physical resolution.

OpenSlide (https://openslide.org) reads the vendor formats; OME-TIFF / SubIFD pyramids and stripped TIFFs,
which it sees as one level or not at all, go through :mod:`foundation_domains.pathology.tiffread`; a slide by URL goes
through :mod:`foundation_domains.pathology.remote` (fsspec + tiffslide). Every slide has a microns-per-pixel value or is
refused: tiles at a target resolution are meaningless without one.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from foundation.data.listing import is_url
from foundation.errors import DataError
from foundation_domains.pathology.tiffread import SegmentCache, TiffReader, composite_on_white

log = logging.getLogger(__name__)

MPP_RANGE = (0.01, 50.0)  # outside this a "resolution" is a screen DPI default, not a microscope's
HOW_TO_SET_MPP = (
    "set it with data.options.slide_mpp=0.25 (every slide) or data.options.mpp_csv=FILE "
    "(CSV with columns slide,mpp), or --slide-mpp / --mpp-csv for `foundation pathology-qc`"
)
_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0}
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _openslide() -> Any | None:
    try:
        import openslide
    except ImportError:  # the tifffile reader still serves TIFFs
        return None
    return openslide


def _plausible(mpp: float) -> bool:
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def find_mpp(props: dict[str, str]) -> tuple[float | None, str]:
    """Microns per pixel from slide metadata: the fallback chain of the reference notes.

    Returns ``(mpp, source)``, or ``(None, what was found)`` so a refusal can say why.
    """
    seen = []
    candidates: list[tuple[str, str | None, float]] = [
        ("openslide.mpp-x", props.get("openslide.mpp-x"), 1.0),
        ("tiffslide.mpp-x", props.get("tiffslide.mpp-x"), 1.0),  # a slide by URL (remote.py)
        ("aperio.MPP", props.get("aperio.MPP"), 1.0),
    ]
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", props.get("tiff.ImageDescription", ""))
    candidates.append(("ImageDescription MPP", match.group(1) if match else None, 1.0))
    unit = props.get("ome.PhysicalSizeXUnit", "µm")
    candidates.append(("OME PhysicalSizeX", props.get("ome.PhysicalSizeX"), _OME_UNIT_UM.get(unit, 0.0)))
    for name, raw, factor in candidates:
        if raw is None:
            continue
        try:
            mpp = float(raw) * factor
        except ValueError:
            seen.append(f"{name}={raw!r}")
            continue
        if _plausible(mpp):
            return mpp, name
        seen.append(f"{name}={raw!r}")
    res, res_unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit", "inch")
    if res is not None:
        try:
            per_unit = float(res)
        except ValueError:
            per_unit = 0.0
        if res_unit in _UNIT_UM and per_unit > 0 and _plausible(_UNIT_UM[res_unit] / per_unit):
            return _UNIT_UM[res_unit] / per_unit, f"TIFF resolution ({res} per {res_unit})"
        seen.append(f"TIFF resolution {res} per {res_unit}")
    power = (
        props.get("openslide.objective-power")
        or props.get("tiffslide.objective-power")
        or props.get("aperio.AppMag")
    )
    if power is None and (
        m := re.search(r"\bAppMag\s*=\s*([0-9.]+)", props.get("tiff.ImageDescription", ""))
    ):
        power = m.group(1)
    try:
        if power is not None and float(power) > 0:
            # Last resort, and said out loud: scanners differ (a "40x" is 0.23-0.26 um/px).
            return 10.0 / float(power), f"objective power {power}x (assumed 10/power um/px)"
    except ValueError:
        seen.append(f"objective power {power!r}")
    return None, ", ".join(seen) or "no resolution metadata"


class TileCache:
    """The decoded-tile caches one worker shares across all its open slides (OpenSlide's and tifffile's)."""

    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        self.capacity = capacity_bytes
        self.segments = SegmentCache(capacity_bytes)
        self._openslide_cache = None

    def openslide(self) -> Any:
        if self._openslide_cache is None:
            self._openslide_cache = _openslide().OpenSlideCache(self.capacity)
        return self._openslide_cache


class _OpenSlideReader:
    backend = "openslide"

    def __init__(self, path: Path, cache: TileCache | None) -> None:
        osl = _openslide()
        self._slide = osl.OpenSlide(str(path))
        if cache is not None:
            self._slide.set_cache(cache.openslide())
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # read_region gives straight (not premultiplied) RGBA; transparent = not scanned -> white.
        return composite_on_white(np.asarray(self._slide.read_region(location, level, size)))

    def close(self) -> None:
        self._slide.close()


class _TiffRegionReader(TiffReader):
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self.read(level, int(location[0] / ds), int(location[1] / ds), size[0], size[1])


def _dicom_instance(folder: Path) -> Path:
    """The first ``.dcm`` of a DICOM WSI folder that OpenSlide recognises: it finds the series' other
    instances (levels, label, overview) in the folder itself.

    Raises:
        DataError: OpenSlide is missing, or no ``.dcm`` in the folder is a DICOM whole-slide image.
    """
    osl = _openslide()
    if osl is None:
        raise DataError(
            f'{folder}: a DICOM slide folder needs OpenSlide; install it with pip install "foundation[pathology]"'
        )
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".dcm" and not p.name.startswith(".") and p.is_file()
    )
    for file in files:
        try:
            if osl.OpenSlide.detect_format(str(file)) == "dicom":
                return file
        except osl.OpenSlideError:
            continue
    raise DataError(
        f"{folder}: none of its {len(files)} .dcm file(s) is a DICOM whole-slide image that OpenSlide can read"
    )


def _open_reader(path: Path, cache: TileCache | None) -> _OpenSlideReader | _TiffRegionReader:
    """OpenSlide for what it reads well; tifffile for TIFF pyramids OpenSlide flattens or refuses. A folder
    is a DICOM slide (see :func:`foundation_domains.pathology.source.list_slides`)."""
    if path.is_dir():
        return _OpenSlideReader(_dicom_instance(path), cache)
    osl = _openslide()
    fmt = None
    if osl is not None:
        try:
            fmt = osl.OpenSlide.detect_format(str(path))
        except osl.OpenSlideError:
            fmt = None
    if fmt is not None and fmt != "generic-tiff":
        return _OpenSlideReader(path, cache)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error... on non-TIFFs
        if osl is None and path.suffix.lower() not in (".tif", ".tiff"):
            raise DataError(
                f"{path}: not a TIFF, and OpenSlide is not installed to read other slide formats; "
                'install it with pip install "foundation[pathology]"'
            ) from e
        raise DataError(f"{path}: not a slide that OpenSlide or tifffile can read ({e})") from e
    try:
        reader = _TiffRegionReader(path, tif, cache.segments if cache is not None else None)
    except Exception as e:
        tif.close()
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read the TIFF's image structure ({e})") from e
    # A plain tiled pyramid with top-level reduced pages: OpenSlide reads it as fast or faster.
    if fmt == "generic-tiff" and not tif.is_ome:
        openslide_reader = _OpenSlideReader(path, cache)
        if len(openslide_reader.level_dimensions) >= len(reader.level_dimensions):
            reader.close()
            return openslide_reader
        openslide_reader.close()
    return reader


class Slide:
    """A whole-slide image with a physical resolution.

    Attributes:
        level_dimensions: ``(width, height)`` per level, level 0 the largest.
        level_downsamples: level-0 pixels per level pixel.
        mpp: microns per level-0 pixel; ``mpp_source`` says where it came from.
    """

    def __init__(
        self, path: str | os.PathLike, mpp: float | None = None, cache: TileCache | None = None
    ) -> None:
        """Open ``path`` (a local file or folder, or a URL); ``mpp`` overrides the file's own resolution.

        Raises:
            DataError: missing or unreadable file (or URL), or no usable resolution (the message says how to
                supply one).
        """
        remote = is_url(path)
        # a URL stays a string: Path() would fold "https://" to "https:/"
        self.path: Path | str = str(path) if remote else Path(path)
        if not remote and not self.path.exists():
            raise DataError(f"slide {str(self.path)!r} does not exist")
        osl = _openslide()
        errors = (osl.OpenSlideError,) if osl is not None else ()
        try:
            if remote:
                from foundation_domains.pathology.remote import RemoteSlideReader

                self._reader = RemoteSlideReader(str(path))
            else:
                self._reader = _open_reader(self.path, cache)
        except errors as e:
            raise DataError(f"{self.path}: OpenSlide cannot open it ({e})") from e
        self.level_dimensions: tuple[tuple[int, int], ...] = self._reader.level_dimensions
        self.level_downsamples: tuple[float, ...] = self._reader.level_downsamples
        self.properties: dict[str, str] = self._reader.properties
        self.backend: str = self._reader.backend
        if mpp is not None:
            if not _plausible(float(mpp)):
                self.close()
                raise DataError(f"{self.path}: mpp override {mpp!r} is outside {MPP_RANGE} um/px")
            self.mpp, self.mpp_source = float(mpp), "override"
            return
        found, source = find_mpp(self.properties)
        if found is None:
            self.close()
            raise DataError(
                f"{self.path}: no usable resolution (microns per pixel) in the file ({source}); {HOW_TO_SET_MPP}"
            )
        if source.startswith("objective power"):
            log.warning("%s: no resolution metadata; using %.3f um/px from %s", self.path, found, source)
        self.mpp, self.mpp_source = found, source

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level(self, mpp: float) -> int:
        """The coarsest level at least as fine as ``mpp`` (level 0 when the slide is coarser: upsampling)."""
        fine_enough = [lv for lv in range(self.level_count) if self.level_mpp(lv) <= mpp * 1.01]
        return max(fine_enough) if fine_enough else 0

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """``size[1] x size[0] x 3`` uint8 at ``level``, top-left at level-0 pixel ``location`` (OpenSlide's
        convention); transparent or unscanned pixels are white.

        Raises:
            DataError: the region could not be decoded (the file is named).
        """
        loc, sz = (int(location[0]), int(location[1])), (int(size[0]), int(size[1]))
        osl = _openslide()
        errors = (osl.OpenSlideError,) if osl is not None else ()
        try:
            return self._reader.read_region(loc, level, sz)
        except errors as e:  # the handle is unusable after this; callers drop it
            raise DataError(f"{self.path}: cannot read level {level} at {loc}: {e}") from e

    def read_at_mpp(self, mpp: float, chunk: int = 2048) -> np.ndarray:
        """The whole slide resampled to ``mpp`` um/px, read in chunks so memory stays bounded."""
        level = self.best_level(mpp)
        ds, (lw, lh) = self.level_downsamples[level], self.level_dimensions[level]
        scale = self.level_mpp(level) / mpp
        out_w, out_h = max(1, round(lw * scale)), max(1, round(lh * scale))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for y in range(0, lh, chunk):
            for x in range(0, lw, chunk):
                w, h = min(chunk, lw - x), min(chunk, lh - y)
                ox0, oy0 = round(x * scale), round(y * scale)
                ox1, oy1 = min(out_w, round((x + w) * scale)), min(out_h, round((y + h) * scale))
                if ox1 <= ox0 or oy1 <= oy0:
                    continue
                region = self.read_region((round(x * ds), round(y * ds)), level, (w, h))
                out[oy0:oy1, ox0:ox1] = cv2.resize(
                    region, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA
                )
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide with its longer side at most ``max_size`` pixels."""
        mpp = max(self.mpp, max(self.dimensions) * self.mpp / max_size)
        return self.read_at_mpp(mpp)

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.close()
            self._reader = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, {self.backend}, {self.dimensions}, mpp={self.mpp:.4g})"


def open_slide(path: str | os.PathLike, mpp: float | None = None, cache: TileCache | None = None) -> Slide:
    """Open a slide (see :class:`Slide`)."""
    return Slide(path, mpp=mpp, cache=cache)


class SlideCache:
    """A worker's open slides: at most ``max_open`` handles, least recently used closed first.

    Handles never cross a fork: a worker that inherits the cache starts empty (libtiff/OpenSlide file
    offsets are not safe to share between processes).
    """

    def __init__(self, max_open: int = 8, tile_cache_bytes: int = 64 << 20) -> None:
        self.max_open = max_open
        self.tile_cache_bytes = tile_cache_bytes
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._slides: OrderedDict[tuple[str, float | None], Slide] = OrderedDict()
        self.tiles = TileCache(self.tile_cache_bytes)

    def get(self, path: str | os.PathLike, mpp: float | None = None) -> Slide:
        if self._pid != os.getpid():
            self._reset()
        key = (str(path), mpp)
        slide = self._slides.get(key)
        if slide is not None:
            self._slides.move_to_end(key)
            return slide
        slide = Slide(path, mpp=mpp, cache=self.tiles)
        self._slides[key] = slide
        while len(self._slides) > self.max_open:
            self._slides.popitem(last=False)[1].close()
        return slide

    def discard(self, path: str | os.PathLike) -> None:
        """Close and forget ``path`` (after a read error OpenSlide handles are unusable)."""
        for key in [k for k in self._slides if k[0] == str(path)]:
            self._slides.pop(key).close()

    def __getstate__(self) -> dict[str, int]:
        return {"max_open": self.max_open, "tile_cache_bytes": self.tile_cache_bytes}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__dict__.update(state)
        self._reset()
