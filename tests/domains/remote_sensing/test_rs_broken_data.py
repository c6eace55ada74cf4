"""Broken files and bad pixels among good data: ``foundation stats`` and remote-sensing pretraining skip a
truncated GeoTIFF (it opens, then fails mid-read) and name it once, treat NaN/infinite pixels as missing and
report their share, skip a file with no valid pixel, and stop with one ``DataError`` only when nothing is
usable. The pretraining stream stays a function of the sample index whatever failed before."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rs_testdata import random_bands, write_raster

from foundation.batch import EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.data.seeding import generator_for
from foundation.errors import DataError
from foundation_domains.remote_sensing import sampling
from foundation_domains.remote_sensing.raster import scan_rasters, value_scale
from foundation_domains.remote_sensing.sampling import RasterSampleSource
from foundation_domains.remote_sensing.stats import BandStats


def truncated(path: Path, seed: int = 9, *, header_only: bool = False) -> Path:
    """A real GeoTIFF cut in half (or just after its header): it opens, then its second half (or all of it)
    cannot be read."""
    write_raster(
        path, random_bands(4, 128, 96, "uint16", seed=seed), tiled=True, blockxsize=32, blockysize=32
    )
    with rasterio.open(path) as ds:
        first_block = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
    raw = path.read_bytes()
    path.write_bytes(raw[: first_block if header_only else first_block + (len(raw) - first_block) // 2])
    return path


def good(path: Path, seed: int, height: int = 60, width: int = 50) -> tuple[Path, np.ndarray]:
    data = random_bands(4, height, width, "uint16", seed=seed)
    return write_raster(path, data), data


def pixels(*arrays: np.ndarray) -> np.ndarray:
    """Valid pixels x bands of bands x H x W arrays (NaN/inf anywhere makes a pixel missing)."""
    x = np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays]).astype(np.float64)
    return x[np.isfinite(x).all(axis=1)]


def stats_command(capsys, data: Path, out: Path) -> tuple[int, dict, str]:
    code = main(["stats", str(data), "--out", str(out), "--window", "32", "--quiet"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, captured.err


# -- foundation stats ----------------------------------------------------------------------------------------
def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many log records mention ``text``."""
    return sum(text in r.getMessage() for r in caplog.records)


def test_stats_skips_a_truncated_geotiff_and_names_it(tmp_path: Path, capsys, caplog) -> None:
    _, a = good(tmp_path / "data" / "a.tif", 1)
    _, c = good(tmp_path / "data" / "c.tif", 2, 40, 70)
    bad = truncated(tmp_path / "data" / "b.tif")
    code, summary, _ = stats_command(capsys, tmp_path / "data", tmp_path / "stats.json")
    assert code == EXIT_SOME_SKIPPED
    assert [s["file"] for s in summary["skipped"]] == [str(bad)]
    assert summary["skipped"][0]["reason"].startswith("read error: b.tif, band 1: IReadBlock failed")
    assert logged(caplog, str(bad)) == 1
    assert summary["files"] == 2
    stats = BandStats.load(tmp_path / "stats.json")  # the good files only, none of the broken one's windows
    ref = pixels(a, c) / 10000
    np.testing.assert_allclose(stats.mean, ref.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, ref.std(axis=0), rtol=1e-9)
    assert stats.skipped == summary["skipped"]


def test_stats_with_nothing_readable_is_one_error(tmp_path: Path, capsys) -> None:
    truncated(tmp_path / "data" / "a.tif", seed=1)
    truncated(tmp_path / "data" / "b.tif", seed=2)
    code, _, err = stats_command(capsys, tmp_path / "data", tmp_path / "stats.json")
    assert code == EXIT_NOTHING_DONE
    assert err.startswith("error: no valid (non-nodata) pixel") and "b.tif: read error" in err
    assert not (tmp_path / "stats.json").exists()


def nan_scene(path: Path, nan_fraction: float) -> tuple[Path, np.ndarray]:
    data = random_bands(3, 40, 40, "float32", seed=4)
    rows = round(40 * nan_fraction)
    data[1, :rows] = np.nan
    data[0, :rows, :5] = np.inf
    return write_raster(path, data), data


def test_stats_leave_nan_pixels_out_and_report_their_share(tmp_path: Path, capsys, caplog) -> None:
    path, data = nan_scene(tmp_path / "data" / "nan.tif", 0.25)
    with caplog.at_level(logging.WARNING):
        code, summary, _ = stats_command(capsys, path, tmp_path / "stats.json")
    assert code == 0 and summary["nonfinite_fraction"] == 0.25 and summary["pixels"] == 30 * 40
    assert f"{path}: 25.0% of the pixels read are NaN or infinite" in caplog.text
    stats = BandStats.load(tmp_path / "stats.json")
    np.testing.assert_allclose(stats.mean, pixels(data).mean(axis=0), rtol=1e-6)
    assert np.isfinite(stats.std + stats.p2 + stats.p98).all()


def test_stats_skip_an_all_nan_file_among_good_ones(tmp_path: Path, capsys) -> None:
    _, ok = nan_scene(tmp_path / "data" / "a.tif", 0.0)
    all_nan, _ = nan_scene(tmp_path / "data" / "b.tif", 1.0)
    code, summary, _ = stats_command(capsys, tmp_path / "data", tmp_path / "stats.json")
    assert code == EXIT_SOME_SKIPPED and summary["files"] == 1
    assert summary["skipped"] == [
        {
            "file": str(all_nan),
            "reason": "every pixel of the 4 window(s) read is NaN or infinite",
            "kind": "empty",
        }
    ]
    np.testing.assert_allclose(
        BandStats.load(tmp_path / "stats.json").mean, pixels(ok).mean(axis=0), rtol=1e-6
    )


def test_stats_refuse_to_write_over_their_input(tmp_path: Path, capsys) -> None:
    path, _ = good(tmp_path / "a.tif", 1)
    before = path.read_bytes()
    assert main(["stats", str(path), "--out", str(path), "--quiet"]) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in capsys.readouterr().err and path.read_bytes() == before


# -- the pretraining stream ----------------------------------------------------------------------------------
def source_of(folder: Path, **kw) -> RasterSampleSource:
    infos = scan_rasters(folder)
    return RasterSampleSource(infos, [value_scale(i) for i in infos], [0.0] * 4, window=32, **kw)


def draws(source: RasterSampleSource, indexes) -> dict[int, tuple]:
    out = {}
    for i in indexes:
        s = source.sample(i, generator_for(0, i))
        assert np.isfinite(s["image"]).all()
        out[i] = (s["path"], s["window"], s["image"].tobytes())
    return out


def test_stream_skips_unreadable_windows_deterministically(tmp_path: Path, caplog) -> None:
    good(tmp_path / "data" / "a.tif", 1, 80, 80)
    bad = truncated(tmp_path / "data" / "b.tif")  # the largest file: drawn often, half of it unreadable
    forward = draws(source_of(tmp_path / "data"), range(40))
    assert logged(caplog, str(bad)) == 1  # named once, not once per window
    backward = draws(source_of(tmp_path / "data"), reversed(range(40)))  # another order: as in other workers
    assert forward == backward
    from_bad = [w for p, w, _ in forward.values() if p == str(bad)]
    assert from_bad and all(row + h <= 64 for _, row, _, h in from_bad)  # only its readable first half


def test_stream_never_returns_a_window_without_valid_pixels(tmp_path: Path) -> None:
    nan_scene(tmp_path / "data" / "ok.tif", 0.5)
    all_nan, _ = nan_scene(tmp_path / "data" / "nan.tif", 1.0)
    infos = scan_rasters(tmp_path / "data")
    source = RasterSampleSource(infos, [1.0, 1.0], [0.0] * 3, window=16)
    for i in range(30):
        s = source.sample(i, generator_for(0, i))
        assert s["path"] != str(all_nan) and s["mask"].any() and np.isfinite(s["image"]).all()
        assert not s["mask"][: max(0, 20 - s["window"][1])].any()  # the NaN rows are never valid


def test_stream_with_nothing_readable_is_one_data_error(tmp_path: Path, monkeypatch) -> None:
    bad = truncated(tmp_path / "data" / "a.tif", header_only=True)
    monkeypatch.setattr(sampling, "MAX_DRAWS", 50)
    with pytest.raises(
        DataError, match=f"no readable window with a valid pixel in 50 draws .unreadable: {bad}"
    ):
        source_of(tmp_path / "data").sample(0, generator_for(0, 0))


# -- foundation pretrain --domain remote_sensing end to end --------------------------------------------------
QUICK = ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "data.num_workers=0"]
QUICK += ["data.crops.n_local=2", "data.options.stats_windows=8"]


def test_pretraining_goes_on_without_a_truncated_geotiff(tmp_path: Path, capsys, caplog) -> None:
    good(tmp_path / "data" / "a.tif", 1, 100, 110)
    good(tmp_path / "data" / "c.tif", 2, 90, 97)
    bad = truncated(tmp_path / "data" / "b.tif")
    argv = ["pretrain", "--domain", "remote_sensing", "--data", str(tmp_path / "data"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), *QUICK]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert logged(caplog, f"skipping {bad}: read error") == 1 and logged(caplog, str(bad)) == 1
    assert (tmp_path / "run" / "export").is_dir()


def test_pretraining_with_no_usable_file_is_one_error(tmp_path: Path, capsys) -> None:
    truncated(tmp_path / "data" / "a.tif", seed=1)
    write_raster(tmp_path / "data" / "b.tif", np.full((4, 40, 40), np.nan, np.float32))
    argv = ["pretrain", "--domain", "remote_sensing", "--data", str(tmp_path / "data"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), *QUICK]) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: no valid (non-nodata) pixel")
    assert not (tmp_path / "run").exists()
