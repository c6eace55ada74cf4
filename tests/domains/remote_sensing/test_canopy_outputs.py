"""``foundation canopy-height`` never costs a user a file and never reports a broken map as done: inputs are
refused as outputs, a full disk or a read-only folder gives one error naming the path, nothing is left half
written, and the exit status follows the batch rule (0 all done, 2 some skipped, 1 none done)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import rasterio
from canopy_testdata import ConstantNet, FirstBand, meta_for, opts, write_checkpoint
from rs_testdata import random_bands, write_raster

from foundation.batch import EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation_domains.remote_sensing.canopy import cog
from foundation_domains.remote_sensing.canopy.mapping import map_scene, map_scene_safely, report


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def one_error(capsys: pytest.CaptureFixture) -> str:
    """The command's stderr: exactly one ``error:`` line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line[:6] for line in err.splitlines()].count("error:") == 1, err
    return err


def scene(path: Path, size: int = 24, seed: int = 0) -> Path:
    return write_raster(path, random_bands(4, size, size, "uint16", seed=seed))


# -- inputs are never outputs --------------------------------------------------------------------------------
def test_out_that_is_the_input_scene_is_refused_even_with_overwrite(
    tmp_path: Path, checkpoint: Path, capsys
) -> None:
    src = scene(tmp_path / "in.tif")
    before = src.read_bytes()
    argv = ["canopy-height", str(src), "--checkpoint", str(checkpoint), "--out", str(src), "--overwrite"]
    assert main(argv) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in one_error(capsys)
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


@pytest.mark.parametrize("how", ["scene folder", "hard link", "symbolic link"])
def test_outputs_landing_on_inputs_are_refused_before_any_work(
    tmp_path: Path, checkpoint: Path, capsys, how: str
) -> None:
    scenes = tmp_path / "scenes"
    a, b = scene(scenes / "a.tif", seed=1), scene(scenes / "b.tif", seed=2)
    out = tmp_path / "maps"
    if how == "scene folder":
        out = scenes
    else:
        out.mkdir()
        link = out / "a_chm.tif"  # the name the map of a.tif would get
        os.link(b, link) if how == "hard link" else link.symlink_to(b)
    before = {p: p.read_bytes() for p in (a, b)}
    argv = ["canopy-height", str(scenes), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]
    assert main(argv) == EXIT_NOTHING_DONE
    assert "is (or holds) the input" in one_error(capsys)
    assert {p: p.read_bytes() for p in (a, b)} == before
    assert sorted(p.name for p in scenes.iterdir()) == ["a.tif", "b.tif"]


def test_quicklooks_replace_only_our_own_png(tmp_path: Path) -> None:
    src = scene(tmp_path / "in" / "a.tif")
    dst = tmp_path / "chm.tif"
    png = dst.with_suffix(".png")
    png.write_bytes(b"holiday photo")
    result = map_scene_safely(ConstantNet(), meta_for(4), src, dst, opts(quicklook=True, overwrite=True))
    assert result["status"] == "skipped" and "is not a quicklook written by foundation" in result["reason"]
    assert png.read_bytes() == b"holiday photo" and not dst.exists()
    png.unlink()
    assert map_scene(ConstantNet(), meta_for(4), src, dst, opts(quicklook=True))["status"] == "done"
    assert cog.is_our_quicklook(png)
    png.unlink()  # a map already made, its quicklook missing: only the quicklook is written
    assert map_scene(ConstantNet(), meta_for(4), src, dst, opts(quicklook=True))["status"] == "exists"
    assert cog.is_our_quicklook(png)
    assert (
        map_scene(ConstantNet(), meta_for(4), src, dst, opts(quicklook=True, overwrite=True))["status"]
        == "done"
    )


# -- --out that cannot be used: one error, nothing created ---------------------------------------------------
def test_a_file_where_a_folder_is_needed_is_refused(tmp_path: Path, checkpoint: Path, capsys) -> None:
    a, b = scene(tmp_path / "a.tif"), scene(tmp_path / "b.tif")
    out = tmp_path / "maps"
    out.write_text("my notes")
    assert main(["canopy-height", str(a), str(b), "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    assert "exists and is not a folder" in one_error(capsys)
    assert out.read_text() == "my notes"


def test_a_read_only_out_parent_is_one_error(tmp_path: Path, checkpoint: Path, capsys, read_only_dir) -> None:
    src = scene(tmp_path / "a.tif")
    out = read_only_dir / "maps"
    assert main(["canopy-height", str(src), "--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    err = one_error(capsys)
    assert str(read_only_dir) in err and "read-only file system" in err
    assert not out.exists()


def test_a_bad_checkpoint_leaves_no_empty_folder(tmp_path: Path, capsys) -> None:
    src = scene(tmp_path / "a.tif")
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"not a checkpoint")
    out = tmp_path / "new" / "maps"
    assert main(["canopy-height", str(src), "--checkpoint", str(broken), "--out", str(out)]) == 1
    one_error(capsys)
    assert not (tmp_path / "new").exists()


# -- a full disk: the map is not done, nothing is left, the batch goes on ------------------------------------
def random_scene(tmp_path: Path, name: str, size: int) -> Path:
    """Noise, so the map (the first band, through FirstBand) does not compress: its COG is ~its raw size."""
    return write_raster(tmp_path / name, random_bands(4, size, size, "uint16", seed=size))


def test_full_disk_while_writing_the_cog_skips_the_scene_and_leaves_nothing(
    small_disk, tmp_path: Path
) -> None:
    disk = small_disk(2400)  # the 600 x 600 float32 strip file (1.4 MB) fits, the COG after it does not
    small, large = random_scene(tmp_path, "small.tif", 40), random_scene(tmp_path, "large.tif", 600)
    results = [
        map_scene_safely(FirstBand(), meta_for(4), src, disk / f"{src.stem}_chm.tif", opts(batch_size=64))
        for src in (small, large)
    ]
    assert [r["status"] for r in results] == ["done", "skipped"]
    reason = results[1]["reason"]
    assert reason == f"{disk / 'large_chm.tif'}: cannot write (no space left on device)"
    assert sorted(p.name for p in disk.iterdir()) == ["small_chm.tif"]  # no map, no temporary file
    with rasterio.open(disk / "small_chm.tif") as ds:
        assert np.isfinite(ds.read(1)).all()
    assert report(results, True, "model.pt") == EXIT_SOME_SKIPPED


def test_full_disk_while_writing_the_strip_file_is_one_error(small_disk, tmp_path: Path) -> None:
    disk = small_disk(600)  # not even the uncompressed temporary GeoTIFF fits
    src = random_scene(tmp_path, "large.tif", 600)
    result = map_scene_safely(FirstBand(), meta_for(4), src, disk / "chm.tif", opts(batch_size=64))
    assert result["status"] == "skipped"
    assert result["reason"] == f"{disk / 'chm.tif'}: cannot write (no space left on device)"
    assert list(disk.iterdir()) == []
    assert report([result], True, "model.pt") == EXIT_NOTHING_DONE


FakeUsage = namedtuple("FakeUsage", "total used free")


@pytest.mark.parametrize("failure", ["reported", "hidden"])
def test_a_cog_cut_short_is_never_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Where no small disk can be mounted: GDAL's copy raises ENOSPC, or (as on a real full disk) writes a
    file cut short that ``cog_validate`` accepts but that cannot be read; the free space then is nil."""
    real_copy = cog.rasterio.shutil.copy

    def full_disk_copy(src, dst, **kw):
        if failure == "reported":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_copy(src, dst, **kw)
        with open(dst, "r+b") as f:
            f.truncate(os.path.getsize(dst) // 2)
        assert cog.validate_cog(Path(dst))[0]  # what made the old code report it as done
        monkeypatch.setattr(shutil, "disk_usage", lambda _: FakeUsage(1 << 30, 1 << 30, 0))

    monkeypatch.setattr(cog.rasterio.shutil, "copy", full_disk_copy)
    src = random_scene(tmp_path, "scene.tif", 600)
    out = tmp_path / "maps"
    out.mkdir()
    result = map_scene_safely(FirstBand(), meta_for(4), src, out / "chm.tif", opts(batch_size=64))
    assert result == {
        "scene": str(src),
        "status": "skipped",
        "out": str(out / "chm.tif"),
        "reason": f"{out / 'chm.tif'}: cannot write (no space left on device)",
    }
    assert list(out.iterdir()) == []


def test_a_cog_that_does_not_read_back_names_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = cog.rasterio.shutil.copy

    def cut_copy(src, dst, **kw):
        real_copy(src, dst, **kw)
        with open(dst, "r+b") as f:
            f.truncate(os.path.getsize(dst) // 2)

    monkeypatch.setattr(cog.rasterio.shutil, "copy", cut_copy)
    src = random_scene(tmp_path, "scene.tif", 600)
    dst = tmp_path / "chm.tif"
    result = map_scene_safely(FirstBand(), meta_for(4), src, dst, opts(batch_size=64))
    assert result["status"] == "skipped" and not dst.exists()
    assert result["reason"].startswith(f"{dst}: cannot write (read back failed at full resolution, rows ")
    assert [p.name for p in tmp_path.iterdir()] == ["scene.tif"]


# -- NaN and infinite pixels are missing data ----------------------------------------------------------------
def float_scene(path: Path, nan_fraction: float) -> Path:
    data = random_bands(4, 40, 40, "float32", seed=3) * 10000
    rows = round(40 * nan_fraction)
    data[:, :rows, :] = np.nan  # every band, or only one: either makes the pixel missing
    data[2, :rows, :4] = np.inf
    return write_raster(path, data)


def test_nan_pixels_are_mapped_as_nodata_and_reported(tmp_path: Path, caplog) -> None:
    src = float_scene(tmp_path / "scene.tif", 0.25)
    dst = tmp_path / "chm.tif"
    with caplog.at_level(logging.WARNING):
        summary = map_scene(FirstBand(), meta_for(4, scale=1.0), src, dst, opts())
    assert summary["status"] == "done"
    assert summary["nonfinite_fraction"] == 0.25 and summary["valid_fraction"] == 0.75
    assert f"{src}: 25.0% of the pixels are NaN or infinite" in caplog.text
    with rasterio.open(dst) as ds:
        heights = ds.read(1)
    assert np.isnan(heights[:10]).all() and np.isfinite(heights[10:]).all()


def test_an_all_nan_scene_is_skipped_never_an_all_nan_map(tmp_path: Path) -> None:
    src = float_scene(tmp_path / "scene.tif", 1.0)
    dst = tmp_path / "maps" / "chm.tif"
    dst.parent.mkdir()
    result = map_scene_safely(FirstBand(), meta_for(4, scale=1.0), src, dst, opts())
    assert result["status"] == "skipped"
    assert result["reason"] == f"{src}: every pixel is NaN or infinite; nothing to map"
    assert list(dst.parent.iterdir()) == []
    assert report([result], True, "model.pt") == EXIT_NOTHING_DONE


# -- a map is done only for the input it was made of ---------------------------------------------------------
def _map(scenes: list[Path], checkpoint: Path, out: Path, *flags: str) -> int:
    return main(
        ["canopy-height", *map(str, scenes), "--checkpoint", str(checkpoint), "--out", str(out), *flags]
    )


def _results(capsys: pytest.CaptureFixture) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_a_map_of_another_input_of_the_same_name_is_not_done(
    tmp_path: Path, checkpoint: Path, capsys
) -> None:
    a, b = scene(tmp_path / "A" / "scene.tif", seed=1), scene(tmp_path / "B" / "scene.tif", seed=2)
    maps = tmp_path / "maps"
    assert _map([a], checkpoint, maps, "--quiet") == 0
    made = (maps / "scene_chm.tif").read_bytes()
    assert _results(capsys)[0]["status"] == "done"
    assert _map([b], checkpoint, maps, "--quiet") == EXIT_NOTHING_DONE
    [result] = _results(capsys)
    assert result["status"] == "skipped" and "exists for another input" in result["reason"]
    assert str(a.resolve()) in result["reason"] and (maps / "scene_chm.tif").read_bytes() == made
    assert _map([b], checkpoint, maps, "--quiet", "--overwrite") == 0
    assert _results(capsys)[0]["status"] == "done"
    assert cog.map_tags(maps / "scene_chm.tif")["source_path"] == str(b.resolve())
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))  # the input changed since
    assert _map([b], checkpoint, maps, "--quiet") == EXIT_NOTHING_DONE
    assert "before it changed" in _results(capsys)[0]["reason"]


def test_our_maps_under_the_input_folder_are_not_scenes(tmp_path: Path, checkpoint: Path, capsys) -> None:
    sc = tmp_path / "sc"
    scene(sc / "one.tif")
    for _ in range(2):  # the rerun finds its own maps under sc/maps and leaves them out
        assert _map([sc], checkpoint, sc / "maps", "--quiet") == 0
    assert [r["status"] for r in _results(capsys)] == ["done", "exists"]
    foreign = write_raster(sc / "maps" / "theirs.tif", random_bands(4, 24, 24, "uint16"))  # under --out
    assert _map([sc], checkpoint, sc / "maps", "--quiet") == 0
    assert [Path(r["scene"]).name for r in _results(capsys)] == ["one.tif"] and foreign.exists()
    assert _map([sc], checkpoint, tmp_path / "elsewhere", "--quiet") == 0  # maps of ours in sc: tags say so
    assert sorted(Path(r["scene"]).name for r in _results(capsys)) == ["one.tif", "theirs.tif"]
