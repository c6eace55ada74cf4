"""``foundation canopy-height``: GeoTIFFs in, validated COGs out (canopy/mapping.py, canopy/cog.py)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from canopy_testdata import ConstantNet, FirstBand, meta_for, no_temp_files, opts, write_checkpoint
from rs_testdata import random_bands, write_raster

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.errors import DataError, OutputError
from foundation_domains.remote_sensing.canopy.cog import validate_cog
from foundation_domains.remote_sensing.canopy.mapping import map_scene, map_scene_safely


@pytest.mark.parametrize(
    ("crs", "bands", "dtype", "shape", "nodata"),
    [
        ("EPSG:32633", 4, "uint16", (70, 90), 0),
        ("EPSG:4326", 3, "uint8", (45, 33), None),  # geographic, odd sizes
        ("EPSG:3857", 6, "float32", (20, 25), -9999.0),  # smaller than one tile
        ("EPSG:32633", 4, "uint16", (520, 610), 0),  # 512-px COG tiles and an overview
    ],
)
def test_constant_model_maps_a_constant_cog_on_the_input_grid(
    tmp_path: Path, crs: str, bands: int, dtype: str, shape: tuple[int, int], nodata: float | None
) -> None:
    data = random_bands(bands, *shape, dtype, seed=1)
    if nodata is not None:
        data[:, :7, :9] = nodata
    src = write_raster(
        tmp_path / "scene.tif", data, crs=crs, nodata=nodata, res=0.0001 if crs == "EPSG:4326" else 10
    )
    dst = tmp_path / "out" / "chm.tif"
    dst.parent.mkdir()
    summary = map_scene(ConstantNet(), meta_for(bands), src, dst, opts())
    assert summary["status"] == "done" and no_temp_files(dst.parent)
    assert validate_cog(dst)[0]
    with rasterio.open(src) as a, rasterio.open(dst) as b:
        assert (b.crs, b.transform, b.width, b.height) == (a.crs, a.transform, a.width, a.height)
        assert b.dtypes[0] == "float32" and np.isnan(b.nodata)
        assert b.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert b.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
        if min(shape) > 512:
            assert b.block_shapes[0] == (512, 512) and b.overviews(1) == [2]
        out = b.read(1)
    invalid = np.zeros(shape, bool)
    if nodata is not None:
        invalid[:7, :9] = True
    assert np.isnan(out[invalid]).all()
    np.testing.assert_allclose(out[~invalid], 12.25)


def test_the_map_uses_the_checkpoints_normalisation_and_has_no_seams(tmp_path: Path) -> None:
    h, w = 120, 150
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (1000 + 5 * yy + 7 * xx).astype("uint16")
    src = write_raster(tmp_path / "smooth.tif", np.stack([smooth, smooth[::-1]]))
    dst = tmp_path / "chm.tif"
    meta = meta_for(2, mean=[0.3, 0.1], std=[0.05, 0.2], bands=[1, 2])
    map_scene(FirstBand(), meta, src, dst, opts(chunk_width=40))
    with rasterio.open(dst) as ds:
        out = ds.read(1)
    expected = (smooth / 10000.0 - 0.3) / 0.05  # uint16 -> scale 10000, then the checkpoint's mean/std
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(np.diff(out, axis=1)).max() < 0.02  # no jump anywhere (the step is 7 / 10000 / 0.05)


def test_bad_scenes_name_the_file_and_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "maps"
    out.mkdir()
    not_raster = tmp_path / "notes.tif"
    not_raster.write_text("not a raster")
    three = write_raster(tmp_path / "three.tif", random_bands(3, 40, 40, "uint16"))
    empty = write_raster(tmp_path / "empty.tif", np.zeros((4, 50, 50), "uint16"), nodata=0)
    corrupt = write_raster(
        tmp_path / "corrupt.tif",
        random_bands(4, 256, 256, "uint16", seed=3),
        tiled=True,
        blockxsize=64,
        blockysize=64,
        compress="deflate",
    )
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 20000] = np.random.default_rng(0).bytes(20000)
    corrupt.write_bytes(bytes(raw))
    cases = {
        not_raster: "not a readable raster",
        three: "gives 3 band",
        empty: "every pixel is nodata",
        corrupt: "read error in rows",
    }
    for src, reason in cases.items():
        r = map_scene_safely(ConstantNet(), meta_for(4), src, out / f"{src.stem}.tif", opts())
        assert r["status"] == "skipped" and reason in r["reason"] and str(src) in r["reason"]
    assert list(out.iterdir()) == []  # no half-written COG, no temporary file


def test_overwrite_replaces_only_our_own_maps(tmp_path: Path) -> None:
    src = write_raster(tmp_path / "s.tif", random_bands(4, 40, 40, "uint16"))
    dst = tmp_path / "chm.tif"
    dst.write_bytes(b"precious")
    for overwrite in (False, True):  # a file we did not write is never replaced
        with pytest.raises(OutputError, match="not a canopy-height map written by foundation"):
            map_scene(ConstantNet(), meta_for(4), src, dst, opts(overwrite=overwrite))
        assert dst.read_bytes() == b"precious" and no_temp_files(tmp_path)
    dst.unlink()
    assert map_scene(ConstantNet(), meta_for(4), src, dst, opts())["status"] == "done"
    before = dst.stat().st_mtime_ns
    assert map_scene(ConstantNet(), meta_for(4), src, dst, opts())["status"] == "exists"  # done already
    other_model = meta_for(4, mean=[0.3] * 4)
    with pytest.raises(DataError, match="by another model.*--overwrite"):
        map_scene(ConstantNet(), other_model, src, dst, opts())
    assert dst.stat().st_mtime_ns == before
    assert map_scene(ConstantNet(), other_model, src, dst, opts(overwrite=True))["status"] == "done"
    assert validate_cog(dst)[0] and dst.stat().st_mtime_ns != before


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_scene_without_crs_gives_a_map_without_crs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = write_raster(tmp_path / "plain.tif", random_bands(4, 40, 50, "uint16"), crs=None)
    dst = tmp_path / "chm.tif"
    with caplog.at_level(logging.WARNING):
        map_scene(ConstantNet(), meta_for(4), src, dst, opts())
    assert "no CRS" in caplog.text
    with rasterio.open(dst) as ds:
        assert ds.crs is None and (ds.width, ds.height) == (50, 40)


def test_resolution_far_from_training_warns_and_resample_uses_the_training_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = write_raster(tmp_path / "coarse.tif", random_bands(4, 30, 40, "uint16"), res=30.0)
    meta = meta_for(4, gsd=10.0)
    with caplog.at_level(logging.WARNING):
        map_scene(ConstantNet(), meta, src, tmp_path / "a.tif", opts())
    assert "trained at 10 m/px" in caplog.text
    summary = map_scene(ConstantNet(), meta, src, tmp_path / "b.tif", opts(resample=True))
    assert summary["resampled_gsd_m"] == 10.0
    with rasterio.open(src) as a, rasterio.open(tmp_path / "b.tif") as b:
        assert (b.width, b.height) == (120, 90) and b.res == (10.0, 10.0)
        assert b.bounds == a.bounds and b.crs == a.crs


# -- the command end to end, with a real checkpoint ----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_maps_several_scenes_skips_bad_ones_and_never_overwrites(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    a = write_raster(tmp_path / "in" / "a.tif", random_bands(4, 45, 70, "uint16", seed=1), nodata=0)
    b = write_raster(
        tmp_path / "in" / "b.tif", random_bands(4, 33, 33, "uint16", seed=2), crs="EPSG:4326", res=1e-4
    )
    bad = write_raster(tmp_path / "in" / "c.tif", random_bands(2, 33, 33, "uint16"))
    out = tmp_path / "maps"
    argv = ["canopy-height", str(a), str(b), str(bad), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--quicklook", "--quiet", "--batch-size", "3"]) == EXIT_SOME_SKIPPED
    results = {Path(r["scene"]).name: r for r in _json_lines(capsys.readouterr().out)}
    assert results["a.tif"]["status"] == "done" and results["b.tif"]["status"] == "done"
    assert results["c.tif"]["status"] == "skipped" and "c.tif" in results["c.tif"]["reason"]
    for name in ("a", "b"):
        cog = out / f"{name}_chm.tif"
        assert validate_cog(cog)[0] and (out / f"{name}_chm.png").is_file()
        with rasterio.open(cog) as ds:
            heights = ds.read(1)
        assert np.isfinite(heights).all() and (heights >= 0).all()
    assert sorted(p.name for p in out.iterdir()) == [
        "a_chm.png", "a_chm.tif", "b_chm.png", "b_chm.tif", "summary.json"
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())  # the common batch summary
    assert summary["command"] == "canopy-height" and summary["counts"]["written"] == 2
    assert [Path(s["scene"]).name for s in summary["written"]] == ["a.tif", "b.tif"]
    before = os.path.getmtime(out / "a_chm.tif")
    assert main([*argv[:2], *argv[4:], "--quiet"]) == EXIT_DONE  # already mapped by this model: done
    assert _json_lines(capsys.readouterr().out)[0]["status"] == "exists"
    assert os.path.getmtime(out / "a_chm.tif") == before
    assert main([*argv[:2], *argv[4:], "--quiet", "--overwrite"]) == EXIT_DONE
    assert _json_lines(capsys.readouterr().out)[0]["status"] == "done"


def test_cli_refuses_a_file_out_for_several_scenes(tmp_path: Path, checkpoint: Path, capsys) -> None:
    a = write_raster(tmp_path / "a.tif", random_bands(4, 20, 20, "uint16"))
    argv = [
        "canopy-height",
        str(a),
        str(a),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "x.tif"),
    ]
    assert main(argv) == EXIT_NOTHING_DONE
    assert "give a folder" in capsys.readouterr().err


def test_under_torchrun_each_rank_maps_its_share(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import foundation.train.distributed as dist

    rank1 = dist.DistInfo(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(dist, "init_distributed", lambda device: rank1)
    scenes = [
        write_raster(tmp_path / f"s{i}.tif", random_bands(4, 20, 20, "uint16", seed=i)) for i in range(3)
    ]
    out = tmp_path / "maps"
    argv = ["canopy-height", *map(str, scenes), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    # rank 1 of 2: scenes 1, 3, 5, ... and its own summary (rank 0 writes the merged summary.json)
    assert sorted(p.name for p in out.iterdir()) == ["s1_chm.tif", "summary_rank1.json"]
    assert capsys.readouterr().out == ""  # only the main rank prints the summary
