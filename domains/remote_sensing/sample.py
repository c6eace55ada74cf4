"""A synthetic multispectral scene made on the spot, so ``foundation pretrain --domain remote_sensing`` works
before a user has data.

Six Sentinel-2-like bands (blue, green, red, red edge, NIR, SWIR) as uint16 reflectance x 10000 in UTM 33N
at 10 m: smooth terrain decides water, forest, fields, bare soil and a town; each cover has its own spectrum
and texture (canopy speckle, crop rows, street grid), and a slanted orbit edge plus a frame are nodata (0),
as at the border of real tiles. Written deterministically, atomically, once.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from foundation.data.samples import write_sample_folder

BAND_NAMES = ("blue", "green", "red", "red_edge", "nir", "swir1")
# Typical surface reflectance per cover and band.
SPECTRA = {
    "water": (0.06, 0.05, 0.03, 0.02, 0.012, 0.005),
    "forest": (0.025, 0.045, 0.025, 0.11, 0.33, 0.14),
    "crop": (0.045, 0.085, 0.055, 0.19, 0.42, 0.21),
    "soil": (0.09, 0.13, 0.17, 0.21, 0.25, 0.31),
    "urban": (0.11, 0.12, 0.13, 0.15, 0.19, 0.21),
}
SCENE_NAME = "scene.tif"


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise on a ``cells x cells`` grid, upsampled bicubically: a field with features ~size/cells wide."""
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cover class per pixel (index into SPECTRA) and a per-pixel texture in [-1, 1]."""
    terrain = _smooth(rng, size, 6) + 0.4 * _smooth(rng, size, 24)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Fields: irregular rectangular parcels, each crop or bare soil, with rows in its own direction.
    row_edges = np.cumsum(rng.integers(40, 120, 32))
    col_edges = np.cumsum(rng.integers(40, 120, 32))
    parcel = np.searchsorted(row_edges, yy.astype(int)) * 64 + np.searchsorted(col_edges, xx.astype(int))
    parcel_crop = rng.random(64 * 64) < 0.65
    angle = rng.uniform(0, np.pi, 64 * 64)[parcel]
    rows = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / rng.uniform(5, 9))
    names = list(SPECTRA)
    cls = np.where(parcel_crop[parcel], names.index("crop"), names.index("soil"))
    texture = rows
    forest = terrain > 0.5
    cls = np.where(forest, names.index("forest"), cls)
    texture = np.where(forest, np.clip(rng.normal(0, 0.6, (size, size)), -1, 1), texture)
    town = (np.hypot(xx - 0.7 * size, yy - 0.3 * size) < 0.12 * size) & ~forest
    streets = (xx.astype(int) % 24 < 3) | (yy.astype(int) % 24 < 3)
    cls = np.where(town, names.index("urban"), cls)
    texture = np.where(town, np.where(streets, -1.0, 0.5), texture)
    water = terrain < -1.1
    cls = np.where(water, names.index("water"), cls)
    texture = np.where(water, 0.1 * _smooth(rng, size, 64), texture)
    return cls.astype(np.int64), texture.astype(np.float32)


def synthetic_scene(size: int = 1024, seed: int = 0) -> np.ndarray:
    """``6 x size x size`` uint16 reflectance x 10000, nodata (0) on a slanted edge and a 4-px frame."""
    rng = np.random.default_rng(seed)
    cls, texture = _cover(rng, size)
    spectra = np.array(list(SPECTRA.values()), dtype=np.float32)  # (classes, bands)
    refl = spectra[cls].transpose(2, 0, 1)  # (bands, H, W)
    refl = refl * (1 + 0.15 * texture)[None] * (1 + 0.1 * _smooth(rng, size, 12))[None]
    refl += rng.normal(0, 0.004, refl.shape).astype(np.float32)
    data = np.clip(refl * 10000, 1, 65535).astype(np.uint16)  # 0 is reserved for nodata
    yy, xx = np.mgrid[0:size, 0:size]
    outside = (xx + 0.6 * yy > 1.25 * size) | (
        np.minimum(np.minimum(xx, yy), size - 1 - np.maximum(xx, yy)) < 4
    )
    data[:, outside] = 0
    return data


def write_scene(path: Path, size: int = 1024, seed: int = 0) -> Path:
    """Write the scene as a tiled, DEFLATE-compressed GeoTIFF in EPSG:32633 (10 m pixels)."""
    data = synthetic_scene(size, seed)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=len(BAND_NAMES),
        dtype="uint16",
        crs=CRS.from_epsg(32633),
        transform=Affine(10, 0, 500_000, 0, -10, 5_000_000),  # 10 m pixels, north up
        nodata=0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        predictor=2,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = BAND_NAMES
    return path


def make_sample_scene(root: Path, seed: int = 0) -> Path:
    """Write ``root/scene.tif`` once (atomically, as a whole folder) and return ``root``."""
    return write_sample_folder(root, lambda tmp: write_scene(tmp / SCENE_NAME, seed=seed))
