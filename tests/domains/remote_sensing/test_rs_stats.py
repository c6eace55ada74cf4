"""Band statistics: streamed windows agree with numpy on the whole data, nodata excluded; JSON round trip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from rs_testdata import WriteRaster, random_bands, write_raster

from foundation.batch import EXIT_NOTHING_DONE
from foundation.cli import main
from foundation.errors import DataError
from foundation_domains.remote_sensing.raster import scan_rasters, value_scale
from foundation_domains.remote_sensing.stats import BandStats, compute_band_stats, grid_windows, plan_windows


def numpy_reference(arrays: list[np.ndarray], nodata: float, scale: float) -> np.ndarray:
    """Valid pixels (pixels x bands) of (bands x H x W) arrays, a pixel invalid when any band is nodata."""
    pixels = [a.reshape(a.shape[0], -1).T for a in arrays]
    x = np.concatenate(pixels).astype(np.float64)
    return x[(x != nodata).all(axis=1)] / scale


def stats_of(path: Path, **kw) -> BandStats:
    infos = scan_rasters(path)
    return compute_band_stats(infos, [value_scale(i) for i in infos], **kw)


def test_whole_scene_matches_numpy(tmp_path: Path) -> None:
    data = random_bands(3, 150, 211, "uint16", seed=3)
    data[1, :20, :] = 0  # a nodata strip in one band removes those pixels from every band
    data[:, 100:, 180:] = 0
    path = write_raster(tmp_path / "scene.tif", data, nodata=0)
    stats = stats_of(path, window=64)  # odd size: clipped windows at the right and bottom
    ref = numpy_reference([data], 0, 10000)
    np.testing.assert_allclose(stats.mean, ref.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, ref.std(axis=0), rtol=1e-9)
    p2, p98 = np.percentile(ref, [2, 98], axis=0)
    np.testing.assert_allclose(stats.p2, p2, rtol=1e-6)
    np.testing.assert_allclose(stats.p98, p98, rtol=1e-6)
    assert stats.pixels == len(ref) and stats.windows == len(grid_windows(211, 150, 64)) == 12


def test_many_rasters_match_numpy(raster: WriteRaster, tmp_path: Path) -> None:
    arrays = [
        random_bands(2, h, w, "float32", seed=s) for s, (h, w) in enumerate([(40, 50), (33, 77), (64, 64)])
    ]
    for i, a in enumerate(arrays):
        write_raster(tmp_path / "data" / f"r{i}.tif", a, crs=["EPSG:32633", "EPSG:4326", None][i], res=0.01)
    stats = stats_of(tmp_path / "data", window=32)
    ref = numpy_reference(arrays, np.nan, 1.0)
    np.testing.assert_allclose(stats.mean, ref.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, ref.std(axis=0), rtol=1e-9)
    assert stats.files == 3


def test_percentiles_from_bounded_subsample(tmp_path: Path) -> None:
    data = random_bands(2, 200, 200, "float32", seed=5)
    path = write_raster(tmp_path / "big.tif", data)
    stats = stats_of(path, window=50, max_pixels=4000)  # 40,000 pixels, 4,000 kept for percentiles
    p2, p98 = np.percentile(data.reshape(2, -1), [2, 98], axis=1)
    np.testing.assert_allclose(stats.p2, p2, atol=0.01)
    np.testing.assert_allclose(stats.p98, p98, atol=0.01)
    np.testing.assert_allclose(stats.mean, data.reshape(2, -1).mean(axis=1), rtol=1e-6)  # still exact


def test_window_budget_is_bounded_and_seeded(raster: WriteRaster, tmp_path: Path) -> None:
    for i in range(3):
        raster(f"data/r{i}.tif", height=300, width=260, seed=i)
    infos = scan_rasters(tmp_path / "data")
    plan = plan_windows(infos, 32, max_windows=10, seed=0)
    assert len(plan) == 10 and plan == plan_windows(infos, 32, max_windows=10, seed=0)
    assert plan != plan_windows(infos, 32, max_windows=10, seed=1)
    assert plan == sorted(plan, key=lambda p: (p[0], p[1].row_off, p[1].col_off))  # file by file, in order
    assert (
        len(plan_windows(infos, 256, max_windows=100, seed=0)) == 3 * 4
    )  # fewer windows than the budget: all


def test_no_valid_pixel(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "empty.tif", np.zeros((2, 10, 10), np.uint16), nodata=0)
    with pytest.raises(
        DataError, match=re.escape(f"no valid (non-nodata) pixel in the windows read ({path}: ")
    ):
        stats_of(path)


def test_json_round_trip_and_errors(raster: WriteRaster, tmp_path: Path) -> None:
    stats = stats_of(raster("a.tif", count=3), window=32)
    out = stats.save(tmp_path / "stats.json")
    assert BandStats.load(out) == stats
    assert json.loads(out.read_text())["version"] == 1
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left
    with pytest.raises(DataError, match="does not exist; write it with `foundation stats`"):
        BandStats.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": [1]}')
    with pytest.raises(DataError, match=re.escape(f"{bad}: not a band statistics file")):
        BandStats.load(bad)


def test_stats_command(raster: WriteRaster, tmp_path: Path, capsys) -> None:
    path = raster("data/scene.tif", count=12, height=50, width=60, nodata=0)
    out = tmp_path / "stats.json"
    assert main(["stats", str(path), "--bands", "4,3,2", "--window", "16", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {
        "stats": str(out),
        "bands": 3,
        "files": 1,
        "pixels": 50 * 60,
        "nonfinite_fraction": 0.0,
        "skipped": [],
    }
    stats = BandStats.load(out)
    assert stats.bands == [4, 3, 2] and stats.scale == "auto" and len(stats.p98) == 3
    assert main(["stats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == EXIT_NOTHING_DONE
    assert "does not exist" in capsys.readouterr().err
