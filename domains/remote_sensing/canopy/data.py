"""Image / canopy-height label pairs for training and evaluation.

Pairs are matched by file stem (``images/a.tif`` with ``labels/a.tif``). Labels are brought onto the image's
pixel grid on the fly with a rasterio ``WarpedVRT`` when CRS, transform or size differ, so a 1 m lidar CHM in
another projection trains a 0.6 m image model without a preprocessing step; label nodata (and anything
outside the label's footprint) becomes NaN and is masked in the loss and the metrics. Images are read and
normalised with the remote_sensing domain's code (band selection, scale, nodata, statistics), in the units
the backbone was pretrained in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from foundation.data.seeding import generator_for
from foundation.errors import ConfigError, DataError
from foundation_domains.remote_sensing.raster import (
    RasterInfo,
    inspect_raster,
    list_rasters,
    open_raster,
    read_pixels,
)

log = logging.getLogger(__name__)

RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear}
WINDOW_TRIES = 16  # random windows drawn per sample before settling for the one with the most labels


@dataclass(frozen=True)
class Pair:
    """An image and its label raster."""

    image: Path
    label: Path


def match_pairs(images: str | Path, labels: str | Path) -> list[Pair]:
    """Images and labels with the same file stem; images without a label are named in the log and skipped.

    Raises:
        DataError: a missing folder, two labels with one stem, or no image with a label.
    """
    image_files = list_rasters(images)
    by_stem: dict[str, Path] = {}
    for f in list_rasters(labels):
        if f.stem in by_stem:
            raise DataError(f"{f} and {by_stem[f.stem]}: two labels for images named {f.stem!r}")
        by_stem[f.stem] = f
    pairs = [Pair(f, by_stem[f.stem]) for f in image_files if f.stem in by_stem]
    unmatched = [str(f) for f in image_files if f.stem not in by_stem]
    if not pairs:
        raise DataError(
            f"no image under {str(images)!r} has a label with the same file name under {str(labels)!r}"
        )
    if unmatched:
        log.warning("%d image(s) without a label skipped: %s", len(unmatched), ", ".join(unmatched[:5]))
    return pairs


# -- labels on the image grid ------------------------------------------------------------------------------
def _same_grid(image: rasterio.io.DatasetReader, label: rasterio.io.DatasetReader) -> bool:
    return (
        image.crs == label.crs
        and image.width == label.width
        and image.height == label.height
        and image.transform.almost_equals(label.transform)
    )


def check_overlap(image: rasterio.io.DatasetReader, label: rasterio.io.DatasetReader, pair: Pair) -> None:
    """Refuse a label that cannot be placed on its image.

    Raises:
        DataError: the label does not overlap the image, or one of them has no CRS and their sizes differ.
    """
    if image.crs is None or label.crs is None:
        if (image.width, image.height) != (label.width, label.height):
            raise DataError(
                f"{pair.label}: cannot be aligned with its image {pair.image}: "
                f"{'the image' if image.crs is None else 'the label'} has no CRS and the sizes differ "
                f"({label.width}x{label.height} vs {image.width}x{image.height})"
            )
        return
    left, bottom, right, top = transform_bounds(label.crs, image.crs, *label.bounds, densify_pts=21)
    ib = image.bounds
    if min(right, ib.right) <= max(left, ib.left) or min(top, ib.top) <= max(bottom, ib.bottom):
        raise DataError(
            f"{pair.label}: does not overlap its image {pair.image} (label bounds in the image's CRS "
            f"{(round(left, 2), round(bottom, 2), round(right, 2), round(top, 2))}, image bounds "
            f"{tuple(round(v, 2) for v in ib)})"
        )


class LabelOnGrid:
    """Reads label windows in the image's pixel grid: metres, float32, NaN where there is no label."""

    def __init__(
        self,
        image: rasterio.io.DatasetReader,
        label: rasterio.io.DatasetReader,
        pair: Pair,
        resampling: str = "bilinear",
        nodata: float | None = None,
    ) -> None:
        check_overlap(image, label, pair)
        self.extra_nodata = nodata
        if _same_grid(image, label) or image.crs is None or label.crs is None:
            self.source = label
            self.vrt = None
        else:
            self.vrt = WarpedVRT(
                label,
                crs=image.crs,
                transform=image.transform,
                width=image.width,
                height=image.height,
                resampling=RESAMPLING[resampling],
                src_nodata=nodata if nodata is not None else label.nodata,
                nodata=np.nan,
                dtype="float32",
            )
            self.source = self.vrt

    def read(self, window: Window | None = None) -> np.ndarray:
        values = self.source.read(1, window=window, out_dtype="float32")
        mask = self.source.read_masks(1, window=window)
        values[mask == 0] = np.nan
        if self.extra_nodata is not None:
            values[values == np.float32(self.extra_nodata)] = np.nan
        return values

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()


@contextlib.contextmanager
def open_pair(
    pair: Pair, resampling: str = "bilinear", label_nodata: float | None = None
) -> Iterator[tuple[rasterio.io.DatasetReader, LabelOnGrid]]:
    """The open image and a reader of its label on the image grid."""
    with open_raster(pair.image) as image, open_raster(pair.label) as label:
        reader = LabelOnGrid(image, label, pair, resampling, label_nodata)
        try:
            yield image, reader
        finally:
            reader.close()


# -- normalisation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Normalization:
    """How image pixels become network input: ``(pixels / scale - mean) / std``, nodata pixels 0."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata: float | None = None  # raw nodata value for files that declare none

    def read(
        self,
        ds: rasterio.io.DatasetReader,
        bands: Sequence[int],
        scale: float,
        window: Window | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``C x H x W`` normalised float32 (invalid pixels 0, the mean) and the ``H x W`` valid mask."""
        x, valid, _ = self.read_chunk(ds, bands, scale, window)
        return x, valid

    def read_chunk(
        self,
        ds: rasterio.io.DatasetReader,
        bands: Sequence[int],
        scale: float,
        window: Window | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`read`, plus the ``H x W`` mask of pixels invalid because a value is NaN or infinite."""
        pixels = read_pixels(ds, bands, window, self.nodata)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (pixels.values / np.float32(scale) - mean) / std
        x[~pixels.valid] = 0.0
        return np.ascontiguousarray(x.transpose(2, 0, 1)), pixels.valid, pixels.nonfinite


def inspect_images(pairs: Sequence[Pair], bands: Sequence[int] | None) -> list[RasterInfo]:
    """Header facts of every image; all must give the same number of bands.

    Raises:
        DataError: unreadable image, a band it lacks, or a band count that differs from the first image's.
    """
    infos = [inspect_raster(p.image, bands) for p in pairs]
    for info in infos[1:]:
        if info.channels != infos[0].channels:
            raise DataError(
                f"{info.path}: gives {info.channels} bands, but {infos[0].path} gives {infos[0].channels}; "
                "every image must have the same bands (choose them with --bands)"
            )
    return infos


def check_band_count(info: RasterInfo, expected: int, what: str) -> None:
    """Raises: ConfigError: naming the file and both band counts."""
    if info.channels != expected:
        raise ConfigError(
            f"{info.path}: gives {info.channels} bands but {what} takes {expected}; select {expected} bands "
            f"with --bands (e.g. --bands {','.join(str(b + 1) for b in range(expected))}) or use a model "
            "trained for this band count"
        )


def image_gsd(path: str | Path) -> float | None:
    """Metres per pixel of a raster in a projected CRS with metre units, else None."""
    with open_raster(path) as ds:
        crs = ds.crs
        if crs is None or not crs.is_projected or (crs.linear_units or "").lower() not in ("metre", "meter"):
            return None
        return float(abs(ds.transform.a))


# -- training windows --------------------------------------------------------------------------------------
class CanopyTileDataset(torch.utils.data.Dataset):
    """Endless random ``tile x tile`` windows with labels, a pure function of ``(seed, index)``.

    The image is chosen with probability proportional to its area, the window uniformly inside it; up to
    ``WINDOW_TRIES`` windows are drawn until one has ``min_valid`` of its pixels labelled (else the best one
    is used). Then a random 90-degree rotation and flip (rasters have no "up").
    Samples: ``image`` ``C x tile x tile`` float32, ``height`` ``1 x tile x tile`` float32 (NaN: no label).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        infos: Sequence[RasterInfo],
        scales: Sequence[float],
        norm: Normalization,
        *,
        tile: int,
        seed: int,
        min_valid: float = 0.5,
        resampling: str = "bilinear",
        label_nodata: float | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.infos = list(infos)
        self.scales = list(scales)
        self.norm = norm
        self.tile = tile
        self.seed = seed
        self.min_valid = min_valid
        self.resampling = resampling
        self.label_nodata = label_nodata
        areas = torch.tensor([float(i.width * i.height) for i in self.infos], dtype=torch.float64)
        self.cum_area = torch.cumsum(areas, 0)

    def __len__(self) -> int:
        return 2**62

    def _window(self, g: torch.Generator, info: RasterInfo) -> Window:
        w, h = min(self.tile, info.width), min(self.tile, info.height)
        col = int(torch.randint(0, info.width - w + 1, (1,), generator=g))
        row = int(torch.randint(0, info.height - h + 1, (1,), generator=g))
        return Window(col, row, w, h)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = generator_for(self.seed, index)
        r = float(torch.rand(1, generator=g, dtype=torch.float64)) * float(self.cum_area[-1])
        picked = torch.searchsorted(self.cum_area, torch.tensor([r], dtype=torch.float64), right=True)
        k = min(int(picked), len(self.pairs) - 1)
        pair, info = self.pairs[k], self.infos[k]
        windows = [self._window(g, info) for _ in range(WINDOW_TRIES)]
        rot = int(torch.randint(0, 4, (1,), generator=g))
        flip = bool(torch.randint(0, 2, (1,), generator=g))
        with open_pair(pair, self.resampling, self.label_nodata) as (ds, labels):
            best, best_frac = None, -1.0
            for win in windows:
                label = labels.read(win)
                frac = float(np.isfinite(label).mean())
                if frac > best_frac:
                    best, best_frac, best_label = win, frac, label
                if frac >= self.min_valid:
                    break
            image, valid = self.norm.read(ds, info.bands, self.scales[k], best)
        label = np.where(valid, best_label, np.nan).astype(np.float32)
        image, label = _pad(image, label, self.tile)
        image, label = _augment(image, rot, flip), _augment(label[None], rot, flip)
        return {"image": torch.from_numpy(image), "height": torch.from_numpy(label)}


def _pad(image: np.ndarray, label: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Images smaller than a tile: zeros (the mean) and no labels around them."""
    _, h, w = image.shape
    if h == tile and w == tile:
        return image, label
    image = np.pad(image, ((0, 0), (0, tile - h), (0, tile - w)))
    label = np.pad(label, ((0, tile - h), (0, tile - w)), constant_values=np.nan)
    return image, label


def _augment(x: np.ndarray, rot: int, flip: bool) -> np.ndarray:
    x = np.rot90(x, rot, axes=(-2, -1))
    if flip:
        x = x[..., ::-1]
    return np.ascontiguousarray(x)


def read_pair(
    pair: Pair,
    norm: Normalization,
    bands: Sequence[int],
    scale: float,
    resampling: str = "bilinear",
    label_nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A whole image (``C x H x W`` normalised), its valid mask and its label on its grid (NaN: none)."""
    with open_pair(pair, resampling, label_nodata) as (ds, labels):
        image, valid = norm.read(ds, bands, scale)
        label = labels.read()
    return image, valid, np.where(valid, label, np.nan).astype(np.float32)


# -- the embedded sample -----------------------------------------------------------------------------------
SAMPLE_SIZE = 384
LABEL_NODATA = -9999.0


def sample_heights(scene: np.ndarray) -> np.ndarray:
    """Synthetic canopy heights (metres) from the sample scene's reflectance: a vegetation index
    (NDVI damped by the SWIR/NIR ratio, high for forest, lower for crops, ~0 elsewhere) times NIR brightness,
    so the height is a smooth function of the bands that a network can learn; nodata where the scene has none.
    """
    refl = scene.astype(np.float32) / 10000.0
    red, nir, swir = refl[2], refl[4], refl[5]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    vegetation = ndvi * (1.0 - swir / np.maximum(nir, 1e-6))
    heights = np.clip(100.0 * (vegetation - 0.35), 0.0, None) * (nir / 0.33)
    heights = np.clip(heights, 0.0, 96.0).astype(np.float32)
    heights[(scene == 0).all(axis=0)] = LABEL_NODATA
    return heights


def make_canopy_sample(root: Path, seed: int = 0) -> Path:
    """``root/images/scene.tif`` (the domain's 6-band sample scene, smaller) and ``root/labels/scene.tif``
    (float32 heights, nodata -9999), written once and atomically; returns ``root``."""
    from foundation.data.samples import write_sample_folder
    from foundation_domains.remote_sensing.sample import synthetic_scene, write_scene

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        image = write_scene(tmp / "images" / "scene.tif", size=SAMPLE_SIZE, seed=seed)
        heights = sample_heights(synthetic_scene(SAMPLE_SIZE, seed))
        with open_raster(image) as src:
            profile = dict(src.profile, count=1, dtype="float32", nodata=LABEL_NODATA, predictor=3)
        with rasterio.open(tmp / "labels" / "scene.tif", "w", **profile) as dst:
            dst.write(heights[None])

    return write_sample_folder(root, fill)
