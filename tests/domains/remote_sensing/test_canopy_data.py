"""Canopy-height data: labels warped onto the image grid, nodata masked, pairs matched, deterministic windows."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rs_testdata import write_raster

from foundation.errors import ConfigError, DataError
from foundation_domains.remote_sensing.canopy.data import (
    CanopyTileDataset,
    Normalization,
    Pair,
    check_band_count,
    inspect_images,
    make_canopy_sample,
    match_pairs,
    open_pair,
    read_pair,
)

X0, Y0 = 300_000.0, 5_000_000.0  # write_raster's origin


def _write(path: Path, data: np.ndarray, crs: str | None, transform: Affine | None, nodata=None) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0])
    geo = {"crs": crs, "transform": transform} if crs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", dtype=data.dtype, nodata=nodata, **profile, **geo) as dst:
            dst.write(data)
    return path


def _easting_label(res: float, size: int) -> tuple[np.ndarray, Affine]:
    """Heights = (easting - X0) / 20 m at the pixel centres, on a ``res`` grid in EPSG:32633."""
    transform = Affine(res, 0, X0, 0, -res, Y0)
    cols = np.arange(size) * res + res / 2
    return np.tile(cols / 20.0, (size, 1)).astype(np.float32)[None], transform


def test_a_label_in_another_crs_and_resolution_lands_on_the_image_grid(tmp_path):
    image = write_raster(tmp_path / "img.tif", np.ones((3, 40, 48), np.uint16), res=10.0)
    heights, t5 = _easting_label(5.0, 120)
    bounds = (X0, Y0 - 600, X0 + 600, Y0)
    dst_t, w, h = calculate_default_transform("EPSG:32633", "EPSG:4326", 120, 120, *bounds)
    geo = np.full((1, h, w), -9999, np.float32)
    reproject(heights, geo, src_transform=t5, src_crs="EPSG:32633", dst_transform=dst_t,
              dst_crs="EPSG:4326", resampling=Resampling.nearest, dst_nodata=-9999)  # fmt: skip
    label = _write(tmp_path / "lab.tif", geo, "EPSG:4326", dst_t, nodata=-9999)

    with open_pair(Pair(image, label), "bilinear") as (ds, labels):
        on_grid = labels.read()
    assert on_grid.shape == (40, 48)
    expected = np.tile(np.arange(48) * 0.5 + 0.25, (40, 1))  # image pixel centres: (10 c + 5) / 20
    ok = np.isfinite(on_grid)
    assert ok.mean() > 0.9
    err = np.abs(on_grid - expected)[ok]
    assert np.median(err) < 0.3 and err.max() < 2.0


def test_a_coarser_partial_label_is_resampled_and_nan_outside(tmp_path):
    image = write_raster(tmp_path / "img.tif", np.ones((3, 40, 40), np.uint16), res=10.0)
    heights, t20 = _easting_label(20.0, 10)  # 200 m x 200 m: the top-left half of the image
    label = _write(tmp_path / "lab.tif", heights, "EPSG:32633", t20)
    with open_pair(Pair(image, label), "nearest") as (_, labels):
        on_grid = labels.read()
    assert (
        np.isfinite(on_grid[:20, :20]).all()
        and np.isnan(on_grid[20:]).all()
        and np.isnan(on_grid[:, 20:]).all()
    )
    # nearest from 20 m: image columns 2k and 2k+1 take label column k (centre (20 k + 10) / 20)
    assert on_grid[0, :6].tolist() == [0.5, 0.5, 1.5, 1.5, 2.5, 2.5]


def test_label_nodata_becomes_nan(tmp_path):
    image = write_raster(tmp_path / "img.tif", np.ones((3, 8, 8), np.uint16), res=10.0)
    values = np.full((1, 8, 8), 12.0, np.float32)
    values[0, :2] = -9999
    values[0, 7, 7] = -1
    label = write_raster(tmp_path / "lab.tif", values, res=10.0, nodata=-9999)
    with open_pair(Pair(image, label)) as (_, labels):
        a = labels.read()
    assert np.isnan(a[:2]).all() and (a[2:7] == 12).all() and a[7, 7] == -1
    undeclared = write_raster(tmp_path / "lab2.tif", values, res=10.0)  # no nodata in the file
    with open_pair(Pair(image, undeclared), label_nodata=-9999) as (_, labels):
        assert np.isnan(labels.read()[:2]).all()


def test_a_label_that_does_not_overlap_its_image_is_refused_naming_both(tmp_path):
    image = write_raster(tmp_path / "scene.tif", np.ones((3, 8, 8), np.uint16), res=10.0)
    far = _write(tmp_path / "far.tif", np.ones((1, 8, 8), np.float32), "EPSG:32633",
                 Affine(10, 0, X0 + 5_000, 0, -10, Y0))  # fmt: skip
    match = r"far\.tif: does not overlap its image .*scene\.tif"
    with pytest.raises(DataError, match=match), open_pair(Pair(image, far)):
        pass
    bare = _write(tmp_path / "bare.tif", np.ones((1, 4, 4), np.float32), None, None)
    match = r"bare\.tif: cannot be aligned with its image .*scene\.tif"
    with pytest.raises(DataError, match=match), open_pair(Pair(image, bare)):
        pass


def test_pairs_are_matched_by_file_stem(tmp_path, caplog):
    for name in ("a", "b", "c"):
        write_raster(tmp_path / "img" / f"{name}.tif", np.ones((3, 4, 4), np.uint16))
    for name in ("a", "c", "z"):
        write_raster(tmp_path / "lab" / f"{name}.tif", np.ones((1, 4, 4), np.float32))
    pairs = match_pairs(tmp_path / "img", tmp_path / "lab")
    assert [(p.image.name, p.label.parent.name) for p in pairs] == [("a.tif", "lab"), ("c.tif", "lab")]
    assert "b.tif" in caplog.text
    with pytest.raises(DataError, match="no image under"):
        match_pairs(tmp_path / "img", tmp_path / "lab" / "z.tif")


def test_band_count_mismatch_names_the_file_and_both_counts(tmp_path):
    image = write_raster(tmp_path / "four.tif", np.ones((4, 4, 4), np.uint16))
    (info,) = inspect_images([Pair(image, image)], None)
    with pytest.raises(ConfigError, match=r"four\.tif: gives 4 bands but the backbone takes 6"):
        check_band_count(info, 6, "the backbone")
    (info,) = inspect_images([Pair(image, image)], (1, 2, 3))
    check_band_count(info, 3, "the backbone")


def _aligned_pair(tmp_path: Path, size: int = 40) -> tuple[Pair, np.ndarray]:
    """A one-band float image equal to its label, so any misalignment after rotation/flip shows."""
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 30, (1, size, size)).astype(np.float32)
    image_values = values.copy()
    image_values[0, :5, :5] = -1  # image nodata
    label_values = values.copy()
    label_values[0, -8:] = -9999  # no lidar there
    image = write_raster(tmp_path / "img" / "t.tif", image_values, nodata=-1)
    label = write_raster(tmp_path / "lab" / "t.tif", label_values, nodata=-9999)
    return Pair(image, label), values


def _dataset(pair: Pair, tile: int = 16, min_valid: float = 0.5, seed: int = 3) -> CanopyTileDataset:
    infos = inspect_images([pair], None)
    norm = Normalization(mean=(0.0,), std=(1.0,))
    return CanopyTileDataset([pair], infos, [1.0], norm, tile=tile, seed=seed, min_valid=min_valid)


def test_training_windows_are_deterministic_aligned_and_masked(tmp_path):
    pair, _ = _aligned_pair(tmp_path)
    ds = _dataset(pair)
    samples = [ds[i] for i in range(12)]
    assert all(s["image"].shape == (1, 16, 16) and s["height"].shape == (1, 16, 16) for s in samples)
    again = _dataset(pair)[5]
    assert all(np.array_equal(again[k].numpy(), samples[5][k].numpy(), equal_nan=True) for k in again)
    assert not np.array_equal(samples[0]["image"].numpy(), samples[1]["image"].numpy())
    for s in samples:
        label, image = s["height"][0].numpy(), s["image"][0].numpy()
        ok = np.isfinite(label)
        np.testing.assert_array_equal(image[ok], label[ok])  # rotations and flips move both together
    # nodata image pixels have no label; windows with enough labels are preferred
    other = _dataset(pair, min_valid=1.0)
    fractions = [float(np.isfinite(other[i]["height"].numpy()).mean()) for i in range(12)]
    assert np.mean(fractions) > 0.9


def test_image_nodata_masks_the_label(tmp_path):
    pair, values = _aligned_pair(tmp_path)
    (info,) = inspect_images([pair], None)
    image, valid, label = read_pair(pair, Normalization(mean=(0.0,), std=(1.0,)), info.bands, 1.0)
    assert not valid[:5, :5].any() and (image[0, :5, :5] == 0).all()
    assert np.isnan(label[:5, :5]).all() and np.isnan(label[-8:]).all()
    np.testing.assert_array_equal(label[10:20, 10:20], values[0, 10:20, 10:20])


def test_an_image_smaller_than_a_tile_is_padded_without_labels(tmp_path):
    pair, _ = _aligned_pair(tmp_path, size=12)
    s = _dataset(pair, tile=16, min_valid=0.0)[0]
    assert s["image"].shape == (1, 16, 16)
    assert np.isnan(s["height"].numpy()).sum() >= 16 * 16 - 12 * 12


def test_the_embedded_sample_pairs_an_image_with_heights(tmp_path):
    root = make_canopy_sample(tmp_path / "sample")
    (pair,) = match_pairs(root / "images", root / "labels")
    with rasterio.open(pair.image) as img, rasterio.open(pair.label) as lab:
        assert img.count == 6 and (img.width, img.height) == (lab.width, lab.height)
        heights = lab.read(1, masked=True)
    assert heights.min() >= 0 and 10 < heights.max() <= 96
    assert 0.02 < heights.mask.mean() < 0.5  # the scene's nodata edge has no labels
    assert make_canopy_sample(tmp_path / "sample") == root  # written once
