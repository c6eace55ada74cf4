"""Tissue detection on a low-resolution image of a slide, the tile grid at a target resolution, and a QC picture.

The mask is HSV saturation on a thumbnail (glass is grey-white, stained tissue is coloured): median blur,
Otsu threshold (clipped) or a fixed one, morphological close, small specks and holes removed. Tiles form a grid
in level-0 pixels whose side covers ``tile_size * mpp`` microns, with a step of ``tile_size - overlap`` target
pixels (TRIDENT's and CLAM's overlap); each keeps its tissue fraction.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from foundation.errors import OutputError
from foundation.outputs import output_error, write_verified
from foundation_domains.pathology.regions import qupath_origin
from foundation_domains.pathology.slide import Slide

if TYPE_CHECKING:
    from foundation_domains.pathology.regions import Region

OTSU = "otsu"
MASK_MAX_SIDE = 4096  # mask pixels on the longer side, whatever the slide size
QC_MARK = ("foundation", "pathology-qc")  # PNG text chunk of our QC pictures: only those may be replaced


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how its pixels map to the slide."""

    mask: np.ndarray  # H x W bool
    mpp: float  # microns per mask pixel
    scale: tuple[float, float]  # level-0 pixels per mask pixel (x, y)


@dataclass(frozen=True)
class TileRules:
    """How tissue is found and which tiles are kept (``data.options`` / ``pathology-qc`` flags).

    Attributes:
        min_tissue: smallest tissue fraction of a kept tile.
        threshold: a fixed saturation threshold (0-255; pixels above it are tissue), or None: Otsu's threshold
            clipped to ``otsu_clip``.
        otsu_clip: bounds of Otsu's threshold (a blank slide and a strongly stained one stay sensible).
        overlap: pixels at the target resolution that neighbouring tiles share (grid step ``tile_size - overlap``).
    """

    min_tissue: float = 0.25
    threshold: float | None = None
    otsu_clip: tuple[int, int] = (8, 30)
    overlap: int = 0


@dataclass(frozen=True)
class Tiling:
    """Tiles of one slide at a target resolution; ``coords`` are level-0 ``(x, y)`` top-left corners."""

    coords: np.ndarray  # N x 2 int64
    tissue: np.ndarray  # N float32, tissue fraction of each tile
    mpp: float  # target microns per pixel of a tile
    tile_size: int  # tile side in output pixels
    level: int  # pyramid level read
    read_size: int  # tile side in pixels of that level (resized to tile_size)
    extent: int  # tile side in level-0 pixels
    overlap: int = 0  # pixels at the target resolution shared by neighbouring tiles

    def __len__(self) -> int:
        return len(self.coords)

    def subset(self, keep: np.ndarray) -> Tiling:
        """The tiles where ``keep`` (N bool) is true, in their order."""
        return replace(self, coords=self.coords[keep], tissue=self.tissue[keep])


def detect_tissue(
    rgb: np.ndarray,
    min_area: int = 16,
    *,
    min_threshold: int = 8,
    max_threshold: int = 30,
    threshold: float | None = None,
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution ``H x W x 3`` uint8 image.

    Otsu adapts to the stain; clipping its threshold keeps a blank slide (where Otsu splits JPEG noise)
    and a strongly stained one (where Otsu would drop pale stroma) sensible. A fixed ``threshold`` replaces
    it (faint stains, or a cohort tuned once with ``pathology-qc``). Components and holes smaller than
    ``min_area`` pixels are removed.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), 7)
    if threshold is None:
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, min_threshold, max_threshold))
    # Near-black pixels (unscanned borders, dust) have a meaningless hue and saturation.
    value = cv2.medianBlur(np.ascontiguousarray(hsv[..., 2]), 7)
    mask = ((saturation > threshold) & (value > 40)).astype(np.uint8)
    # An odd, symmetric kernel: an even one (OpenCV anchors it off-centre) shifts the mask by a pixel.
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    mask = _drop_small(mask, min_area)
    holes = _drop_small(1 - mask, min_area)  # background components big enough to be real glass
    return holes == 0


def _drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False  # label 0 is the other class
    return keep[labels].astype(np.uint8)


def mask_mpp_for(slide: Slide, tile_microns: float) -> float:
    """Mask resolution: about 16 mask pixels per tile side, 8 um/px at most, never finer than the slide and
    never more than 4096 pixels on the longer side."""
    longest_microns = max(slide.dimensions) * slide.mpp
    return max(min(tile_microns / 16, 8.0), slide.mpp, longest_microns / MASK_MAX_SIDE)


def tissue_mask(slide: Slide, mpp: float, min_area: int = 16, rules: TileRules | None = None) -> TissueMask:
    """Read the slide at ``mpp`` microns per pixel and detect tissue on it (threshold from ``rules``)."""
    rules = rules or TileRules()
    thumb = slide.read_at_mpp(mpp)
    h, w = thumb.shape[:2]
    w0, h0 = slide.dimensions
    lo, hi = rules.otsu_clip
    mask = detect_tissue(thumb, min_area, min_threshold=lo, max_threshold=hi, threshold=rules.threshold)
    return TissueMask(mask, mpp, (w0 / w, h0 / h))


def mask_for_tiles(slide: Slide, mpp: float, tile_size: int, rules: TileRules | None = None) -> TissueMask:
    """The tissue mask suited to tiles of ``tile_size`` pixels at ``mpp``: specks under a quarter tile dropped."""
    tile_microns = tile_size * mpp
    mask_mpp = mask_mpp_for(slide, tile_microns)
    min_area = max(4, round((tile_microns / mask_mpp) ** 2 / 4))
    return tissue_mask(slide, mask_mpp, min_area=min_area, rules=rules)


def plan_tiles(
    slide: Slide, mask: TissueMask, mpp: float, tile_size: int, min_tissue: float = 0.25, overlap: int = 0
) -> Tiling:
    """The full tiles of the level-0 grid whose tissue fraction is at least ``min_tissue``.

    Neighbours share ``overlap`` pixels at the target resolution: the grid step is ``tile_size - overlap``
    target pixels in level-0 pixels. The level read is the coarsest one at least as fine as ``mpp``; the region
    read there is resized to ``tile_size``.
    """
    extent = max(1, round(tile_size * mpp / slide.mpp))
    step = max(1, round((tile_size - overlap) * mpp / slide.mpp))
    level = slide.best_level(mpp)
    read_size = max(1, round(extent / slide.level_downsamples[level]))
    w0, h0 = slide.dimensions
    xs, ys = np.arange(0, w0 - extent + 1, step), np.arange(0, h0 - extent + 1, step)
    fraction = _area_fraction(mask, xs, ys, extent)
    iy, ix = np.nonzero(fraction >= min_tissue)
    coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)
    tissue = fraction[iy, ix].astype(np.float32)
    return Tiling(coords, tissue, mpp, tile_size, level, read_size, extent, int(overlap))


def tile_slide(
    slide: Slide, mpp: float, tile_size: int, rules: TileRules, region: Region | None = None
) -> tuple[TissueMask, Tiling]:
    """The tissue mask and the kept tiles of one slide: the one tiling rule of pretraining, ``embed`` and
    ``pathology-qc``. With a ``region``, only tiles whose centre lies inside it are kept."""
    mask = mask_for_tiles(slide, mpp, tile_size, rules)
    tiling = plan_tiles(slide, mask, mpp, tile_size, rules.min_tissue, rules.overlap)
    if region is not None:  # the region is in QuPath's pixels: ours less QuPath's origin (MIRAX bounds)
        origin = np.asarray(qupath_origin(slide.properties, slide.dimensions))
        tiling = tiling.subset(region.contains(tiling.coords + tiling.extent / 2 - origin))
    return mask, tiling


def _area_fraction(mask: TissueMask, xs: np.ndarray, ys: np.ndarray, extent: int) -> np.ndarray:
    """Tissue fraction of every grid cell (rows = ys, columns = xs), from an integral image."""
    hm, wm = mask.mask.shape
    integral = cv2.integral(mask.mask.astype(np.uint8)).astype(np.int64)
    sx, sy = mask.scale

    def bounds(starts: np.ndarray, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(starts / scale), 0, limit - 1).astype(np.int64)
        hi = np.clip(np.round((starts + extent) / scale), lo + 1, limit).astype(np.int64)
        return lo, hi

    x0, x1 = bounds(xs, sx, wm)
    y0, y1 = bounds(ys, sy, hm)
    total = (
        integral[np.ix_(y1, x1)]
        - integral[np.ix_(y0, x1)]
        - integral[np.ix_(y1, x0)]
        + integral[np.ix_(y0, x0)]
    )
    return total / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


def read_tile(slide: Slide, tiling: Tiling, index: int) -> np.ndarray:
    """Tile ``index`` of ``tiling`` as ``tile_size x tile_size x 3`` uint8."""
    x, y = (int(v) for v in tiling.coords[index])
    region = slide.read_region((x, y), tiling.level, (tiling.read_size, tiling.read_size))
    if tiling.read_size == tiling.tile_size:
        return region
    shrink = tiling.read_size > tiling.tile_size
    return cv2.resize(
        region,
        (tiling.tile_size, tiling.tile_size),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC,
    )


def is_our_picture(path: Path) -> bool:
    """``path`` is a PNG carrying our mark (:data:`QC_MARK`), i.e. a QC picture this command wrote."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get(QC_MARK[0]) == QC_MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _png_with_mark(rgb: np.ndarray) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*QC_MARK)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_qc(
    path: str | os.PathLike,
    slide: Slide,
    mask: TissueMask,
    tiling: Tiling,
    max_size: int = 1024,
    region: Region | None = None,
) -> Path:
    """A PNG a person can check at a glance: thumbnail, tissue outline (green), kept tiles (blue), the region
    tiling was restricted to (yellow, when one is given), a caption.

    Written to a temporary name, decoded again and renamed, so a partial picture never looks complete. It
    carries our mark, and only a picture with that mark is ever replaced: a user's file under the name is kept.

    Raises:
        OutputError: ``path`` is taken by a file that is not our picture (left as it is), or the picture cannot
            be written (no space left, ...); nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not is_our_picture(path):
        raise OutputError(
            f"{path} exists and is not a QC picture of ours; it was left as it is (move it or give another --out)"
        )
    canvas = slide.thumbnail(max_size).copy()
    h, w = canvas.shape[:2]
    f = w / slide.dimensions[0]  # thumbnail pixels per level-0 pixel
    # Linear upsampling then a 0.5 threshold: a smooth outline instead of the mask's pixel staircase.
    smooth = cv2.resize(mask.mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    outline = (smooth > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(outline, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    shade = canvas.copy()
    side = tiling.extent * f
    for x, y in tiling.coords:
        p0 = (int(x * f), int(y * f))
        p1 = (int((x + tiling.extent) * f) - 1, int((y + tiling.extent) * f) - 1)
        cv2.rectangle(shade, p0, p1, (40, 90, 230), -1)
        if side >= 6:  # grid lines only where they stay readable
            cv2.rectangle(canvas, p0, p1, (40, 90, 230), 1)
    canvas = cv2.addWeighted(shade, 0.25, canvas, 0.75, 0)
    cv2.drawContours(canvas, contours, -1, (0, 170, 0), 2)
    origin = np.asarray(qupath_origin(slide.properties, slide.dimensions))
    for outer, holes in region.polygons if region is not None else ():
        rings = [np.round((ring + origin) * f).astype(np.int32).reshape(-1, 1, 2) for ring in (outer, *holes)]
        cv2.polylines(canvas, rings, True, (230, 200, 0), 2)
    caption = (
        f"{slide.path.name}  {slide.mpp:.3g} um/px ({slide.mpp_source})  tiles: {len(tiling)} x "
        f"{tiling.tile_size}px @ {tiling.mpp:g} um/px, level {tiling.level}"
    )
    bar = np.full((22, w, 3), 255, np.uint8)
    cv2.putText(bar, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    picture = np.ascontiguousarray(np.vstack([bar, canvas]))
    png = _png_with_mark(picture)

    def check(tmp: Path) -> None:
        from PIL import Image

        with Image.open(tmp) as image:
            same = np.array_equal(np.asarray(image.convert("RGB")), picture)
        if not (same and is_our_picture(tmp)):
            raise OutputError(f"{path}: the picture written does not read back")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(e, path.parent, "cannot create the folder") from e
    return write_verified(path, lambda tmp: tmp.write_bytes(png), check)
