"""Raster reading: formats, dtypes, CRSs, band selection, nodata / masks / alpha, windows, bad files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window
from rs_testdata import WriteRaster, random_bands, write_raster

from foundation.errors import ConfigError, DataError
from foundation_domains.remote_sensing.options import parse_bands
from foundation_domains.remote_sensing.raster import (
    inspect_raster,
    list_rasters,
    open_raster,
    read_window,
    scan_rasters,
    value_scale,
)


def read_all(path: Path, bands=None, nodata=None):
    info = inspect_raster(path, bands)
    with open_raster(path) as ds:
        return (*read_window(ds, info.bands, None, nodata), info)


@pytest.mark.parametrize(
    ("count", "dtype", "crs", "size"),
    [
        (1, "uint8", "EPSG:4326", (37, 53)),
        (4, "uint16", "EPSG:32633", (70, 91)),
        (12, "float32", "EPSG:3857", (33, 29)),
        (3, "int16", "EPSG:2154", (16, 17)),
    ],
)
def test_reads_any_band_count_dtype_and_crs(tmp_path: Path, count, dtype, crs, size) -> None:
    data = random_bands(count, *size, dtype)
    path = write_raster(tmp_path / "r.tif", data, crs=crs, res=0.001 if crs == "EPSG:4326" else 10.0)
    image, valid, info = read_all(path)
    assert image.dtype == np.float32 and image.shape == (*size, count)
    np.testing.assert_array_equal(image, data.transpose(1, 2, 0).astype(np.float32))
    assert valid.shape == size and valid.all()
    assert info.bands == tuple(range(1, count + 1)) and info.dtype == dtype
    assert info.crs == crs and (info.width, info.height) == (size[1], size[0])


def test_window_read_matches_slice(raster: WriteRaster) -> None:
    path = raster("w.tif", count=5, height=61, width=47)
    with rasterio.open(path) as ds:
        full = ds.read()
        image, valid = read_window(ds, [1, 2, 3, 4, 5], Window(7, 11, 20, 30))
    np.testing.assert_array_equal(image, full[:, 11:41, 7:27].transpose(1, 2, 0))
    assert image.shape == (30, 20, 5) and valid.all()


def test_band_selection_order(raster: WriteRaster) -> None:
    path = raster("s2.tif", count=12, height=20, width=24)
    with rasterio.open(path) as ds:
        full = ds.read().astype(np.float32)
    image, _, info = read_all(path, parse_bands("3,2,1"))
    assert info.bands == (3, 2, 1) and info.channels == 3
    np.testing.assert_array_equal(image, full[[2, 1, 0]].transpose(1, 2, 0))
    image, _, _ = read_all(path, parse_bands([12, 8]))
    np.testing.assert_array_equal(image, full[[11, 7]].transpose(1, 2, 0))


def test_parse_bands() -> None:
    assert parse_bands("3, 2,1") == (3, 2, 1)
    assert parse_bands([4, 3, 2]) == (4, 3, 2)
    assert parse_bands(5) == (5,)
    assert parse_bands(None) is None and parse_bands("all") is None and parse_bands("") is None
    with pytest.raises(ConfigError, match="start at 1"):
        parse_bands("0,1")
    with pytest.raises(ConfigError, match=re.escape("data.options.bands='red'")):
        parse_bands("red")


def test_band_out_of_range_names_file(raster: WriteRaster) -> None:
    path = raster("four.tif", count=4)
    with pytest.raises(DataError, match=re.escape(f"{path}: has 4 bands, cannot select band(s) [5]")):
        inspect_raster(path, (5, 3, 2))


def test_nodata_value_masks_pixels(tmp_path: Path) -> None:
    data = random_bands(3, 20, 30, "uint16")
    data[0, :5, :] = 0  # nodata in one band only: the pixel is invalid
    data[:, 10, 10] = 0
    path = write_raster(tmp_path / "nd.tif", data, nodata=0)
    image, valid, _ = read_all(path)
    expected = np.ones((20, 30), bool)
    expected[:5] = False
    expected[10, 10] = False
    np.testing.assert_array_equal(valid, expected)
    assert image[0, 0, 0] == 0  # values untouched; filling is the caller's choice


def test_nan_nodata_float(tmp_path: Path) -> None:
    data = random_bands(2, 10, 12, "float32")
    data[1, 3, 4] = np.nan
    data[0, 0, 0] = np.inf  # not declared nodata, still not a usable value
    path = write_raster(tmp_path / "nan.tif", data, nodata=np.nan)
    _, valid, _ = read_all(path)
    assert not valid[3, 4] and not valid[0, 0] and valid.sum() == 10 * 12 - 2


def test_nodata_override_for_files_without_one(tmp_path: Path) -> None:
    data = random_bands(2, 10, 12, "uint16")
    data[:, 2:4, :] = 65535
    path = write_raster(tmp_path / "undeclared.tif", data)
    _, valid, _ = read_all(path)
    assert valid.all()
    _, valid, _ = read_all(path, nodata=65535)
    assert not valid[2:4].any() and valid[:2].all() and valid[4:].all()


def test_internal_mask(tmp_path: Path) -> None:
    path = tmp_path / "masked.tif"
    data = random_bands(4, 16, 16, "uint16")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
        path, "w", driver="GTiff", width=16, height=16, count=4, dtype="uint16", crs="EPSG:32633",
        transform=Affine(10, 0, 0, 0, -10, 0),
    ) as dst:  # fmt: skip
        dst.write(data)
        mask = np.full((16, 16), 255, np.uint8)
        mask[:, :6] = 0
        dst.write_mask(mask)
    _, valid, _ = read_all(path)
    assert not valid[:, :6].any() and valid[:, 6:].all()


def test_alpha_band_is_a_mask_not_data(tmp_path: Path) -> None:
    rgba = random_bands(4, 12, 14, "uint8")
    rgba[3] = 255
    rgba[3, :, :4] = 0
    path = write_raster(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    image, valid, info = read_all(path)
    assert info.bands == (1, 2, 3) and info.is_rgb and image.shape == (12, 14, 3)
    assert not valid[:, :4].any() and valid[:, 4:].all()


def test_file_scale_offset_applied(tmp_path: Path) -> None:
    data = random_bands(2, 8, 8, "uint16")
    path = write_raster(tmp_path / "l2a.tif", data)
    with rasterio.open(path, "r+") as ds:
        ds.scales = (0.0001, 0.0001)
        ds.offsets = (-0.1, -0.1)
    image, _, info = read_all(path)
    assert info.scaled
    np.testing.assert_allclose(image, data.transpose(1, 2, 0) * 0.0001 - 0.1, rtol=1e-5, atol=1e-6)
    assert value_scale(info) == 1.0  # already in physical units


def test_value_scale_from_dtype(raster: WriteRaster) -> None:
    assert value_scale(inspect_raster(raster("a.tif", dtype="uint8"))) == 255
    assert value_scale(inspect_raster(raster("b.tif", dtype="uint16"))) == 10000
    assert value_scale(inspect_raster(raster("c.tif", dtype="float32"))) == 1
    assert value_scale(inspect_raster(raster("d.tif", dtype="uint16")), 4096) == 4096
    with pytest.raises(ConfigError, match="data.options.scale"):
        value_scale(inspect_raster(raster("e.tif")), -3)


def test_no_crs_is_allowed_with_a_warning(raster: WriteRaster, caplog: pytest.LogCaptureFixture) -> None:
    path = raster("plain.tif", count=2, crs=None)
    with caplog.at_level(logging.WARNING, logger="foundation_domains.remote_sensing.raster"):
        info = inspect_raster(path)
    assert info.crs is None
    assert any("no CRS" in r.getMessage() and "plain.tif" in r.getMessage() for r in caplog.records)


def test_non_raster_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("not a raster at all")
    with pytest.raises(DataError, match=re.escape(f"{bad}: not a readable raster")):
        inspect_raster(bad)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        scan_rasters(bad)  # a single file that cannot be read stops the command


def test_folder_skips_broken_file(raster: WriteRaster, tmp_path: Path, caplog) -> None:
    raster("data/a.tif")
    raster("data/sub/b.tiff", seed=1)
    (tmp_path / "data" / "broken.tif").write_bytes(b"\x00" * 100)
    (tmp_path / "data" / "readme.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="foundation_domains.remote_sensing.raster"):
        infos = scan_rasters(tmp_path / "data")
    assert [Path(i.path).name for i in infos] == ["a.tif", "b.tiff"]
    assert any("broken.tif" in r.getMessage() for r in caplog.records)


def test_mismatched_band_counts_name_the_file(raster: WriteRaster, tmp_path: Path) -> None:
    raster("data/a.tif", count=4)
    odd = raster("data/b.tif", count=3)
    with pytest.raises(DataError, match=re.escape(f"{odd}: gives 3 bands, but")):
        scan_rasters(tmp_path / "data")
    infos = scan_rasters(tmp_path / "data", (3, 2, 1))  # a common selection makes them agree
    assert [i.channels for i in infos] == [3, 3]


def test_list_rasters_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list_rasters(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no rasters"):
        list_rasters(tmp_path / "empty")


def test_vrt_and_jpeg2000(raster: WriteRaster, tmp_path: Path) -> None:
    src = raster("src.tif", count=2, height=20, width=30)
    with rasterio.open(src) as ds:
        expected = ds.read().astype(np.float32).transpose(1, 2, 0)
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">src.tif'
        f"</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b in (1, 2)
    )
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="30" rasterYSize="20">{bands}</VRTDataset>')
    image, valid, _ = read_all(vrt)
    np.testing.assert_array_equal(image, expected)
    if "JP2OpenJPEG" not in rasterio.drivers.raster_driver_extensions().values():
        pytest.skip("GDAL was built without JPEG2000")
    jp2 = tmp_path / "tile.jp2"
    with rasterio.open(src) as ds, rasterio.open(jp2, "w", driver="JP2OpenJPEG", **{
        k: v for k, v in ds.profile.items() if k in ("width", "height", "count", "dtype", "crs", "transform")
    }, QUALITY=100, REVERSIBLE=True) as dst:  # fmt: skip
        dst.write(ds.read())
    image, valid, info = read_all(jp2)
    np.testing.assert_array_equal(image, expected)
    assert info.crs == "EPSG:32633" and valid.all()
