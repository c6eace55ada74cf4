"""A tifffile reader for the pyramids OpenSlide does not open: OME-TIFF / SubIFD pyramids and single-level TIFFs.

Regions are assembled from the tiles (or strips) they touch, decoded one segment at a time, so a gigapixel
level is never decoded whole. Decoded segments go to a byte-bounded cache shared by all slides of a worker.
"""

from __future__ import annotations

import math
import sys
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import tifffile

from foundation.errors import DataError


class SegmentCache:
    """LRU of decoded TIFF tiles/strips, bounded in bytes (the tifffile twin of ``OpenSlideCache``)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.size = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.capacity:
            return
        self._items[key] = value
        self.size += value.nbytes
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= old.nbytes


def _opaque(rgba: np.ndarray) -> bool:
    """All alpha 255? As one contiguous uint32 scan (alpha is the high byte on little-endian machines): four
    times faster than a strided scan of the alpha channel, which matters once per tile read."""
    if sys.byteorder == "little" and rgba.dtype == np.uint8 and rgba.flags.c_contiguous:
        return bool(rgba.view(np.uint32).min() >= 0xFF000000)
    return bool(rgba[..., 3].min() == 255)


def composite_on_white(pixels: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """RGBA -> RGB over a white background (transparent = outside the scanned area must read as glass)."""
    if pixels.shape[-1] == 3:
        return pixels
    if _opaque(pixels):  # the usual case inside a scan: no blending
        return cv2.cvtColor(pixels, cv2.COLOR_RGBA2RGB)
    rgb = pixels[..., :3].astype(np.uint16)
    alpha = pixels[..., 3:4].astype(np.uint16)
    # Premultiplied ("associated") alpha already holds colour x alpha; straight alpha is blended here.
    out = rgb + (255 - alpha) if premultiplied else (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def _rational(value) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _ome_physical_size(xml: str) -> tuple[str, str] | None:
    """``(PhysicalSizeX, unit)`` of the first OME image, or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Pixels") and element.get("PhysicalSizeX"):
            return element.get("PhysicalSizeX"), element.get("PhysicalSizeXUnit", "µm")
    return None


class TiffReader:
    """One pyramid of a TIFF file, read region by region.

    The pyramid is tifffile's largest series (its levels come from SubIFDs, OME or reduced pages).

    Raises:
        DataError: pixel layout this reader does not handle (planar-separate, not 8-bit, not RGB/grey).
    """

    backend = "tifffile"

    def __init__(self, path: Path, tif: tifffile.TiffFile, cache: SegmentCache | None = None) -> None:
        self.path = path
        self._tif = tif
        self._lock = threading.Lock()
        self._cache = cache
        candidates = [s for s in tif.series if s.levels and len(s.levels[0].shape) >= 2]
        if not candidates:
            raise DataError(f"{path}: the TIFF holds no image")
        series = max(candidates, key=lambda s: int(np.prod(s.levels[0].shape[:2])))
        self._pages = []
        for level in series.levels:
            page = level.pages[0]
            page = page if isinstance(page, tifffile.TiffPage) else page.aspage()
            self._check_layout(page)
            self._pages.append(page)
        w0, h0 = self._pages[0].imagewidth, self._pages[0].imagelength
        self.level_dimensions = tuple((p.imagewidth, p.imagelength) for p in self._pages)
        self.level_downsamples = tuple(
            (w0 / w + h0 / h) / 2 for w, h in self.level_dimensions
        )  # OpenSlide's convention: the mean of both axes
        self.properties = self._properties(tif, self._pages[0])

    def _check_layout(self, page: tifffile.TiffPage) -> None:
        problem = None
        if page.dtype != np.uint8:
            problem = f"{page.dtype} samples (only 8-bit brightfield slides are read)"
        elif page.samplesperpixel not in (1, 3, 4):
            problem = f"{page.samplesperpixel} samples per pixel (expected grey, RGB or RGBA)"
        elif page.samplesperpixel > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG:
            problem = "planar-separate samples"
        elif page.imagedepth > 1:
            problem = "a volume (ImageDepth > 1)"
        if problem:
            raise DataError(f"{self.path}: cannot read this TIFF as a slide: {problem}")

    @staticmethod
    def _properties(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> dict[str, str]:
        """Metadata under OpenSlide's property names, so one MPP fallback chain serves both readers."""
        props = {"openslide.vendor": "ome-tiff" if tif.is_ome else "generic-tiff"}
        if page.description:
            props["tiff.ImageDescription"] = page.description
        tags = page.tags
        if "XResolution" in tags:
            props["tiff.XResolution"] = repr(_rational(tags["XResolution"].value))
            props["tiff.YResolution"] = repr(_rational(tags.get("YResolution", tags["XResolution"]).value))
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else tifffile.RESUNIT.INCH
            props["tiff.ResolutionUnit"] = tifffile.RESUNIT(unit).name.lower()
        if tif.is_ome and tif.ome_metadata:
            size = _ome_physical_size(tif.ome_metadata)
            if size is not None:
                props["ome.PhysicalSizeX"], props["ome.PhysicalSizeXUnit"] = size
        return props

    def close(self) -> None:
        self._tif.close()

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (str(self.path), level, index)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            return hit
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:  # a sparse tile: nothing was scanned there
            th, tw = page.chunks[:2]
            return np.full((th, tw, 3), 255, np.uint8)
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        try:
            segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as e:  # imagecodecs raises its own error types per codec
            raise DataError(f"{self.path}: cannot decode level {level} segment {index}: {e}") from e
        segment = np.asarray(segment).reshape(segment.shape[-3:])
        if segment.shape[-1] == 1:
            segment = np.repeat(segment, 3, axis=-1)
        elif segment.shape[-1] == 4:
            premultiplied = page.extrasamples and page.extrasamples[0] == tifffile.EXTRASAMPLE.ASSOCALPHA
            segment = composite_on_white(segment, premultiplied=bool(premultiplied))
        if self._cache is not None:
            self._cache.put(key, segment)
        return segment

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``height x width x 3`` uint8 from level pixel ``(x, y)``; outside the image reads as white."""
        page = self._pages[level]
        w, h = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x0 >= x1 or y0 >= y1:
            return out
        th, tw = page.chunks[:2]
        per_row = math.ceil(w / tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                seg = self._segment(level, ty * per_row + tx)
                sx0, sy0 = max(x0, tx * tw), max(y0, ty * th)
                sx1, sy1 = (
                    min(x1, (tx + 1) * tw, tx * tw + seg.shape[1]),
                    min(y1, (ty + 1) * th, ty * th + seg.shape[0]),
                )
                if sx0 < sx1 and sy0 < sy1:
                    out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = seg[
                        sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw
                    ]
        return out
