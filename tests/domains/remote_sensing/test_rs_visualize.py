"""``foundation visualize --domain remote_sensing``: a raster window, the bands fed to the model, a composite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rs_testdata import WriteRaster

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.remote_sensing.raster import inspect_raster
from foundation_domains.remote_sensing.visualize import composite, read_scene_window


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", in_chans=3, img_size=32, patch_size=8, reg_tokens=0)
    out = tmp_path_factory.mktemp("bb") / "export"
    return export_backbone(build_vit(**args), args, out, mean=(0.1,) * 3, std=(0.05,) * 3)


def test_window_values_and_nodata(raster: WriteRaster) -> None:
    path = raster("nodata.tif", count=2, height=20, width=30, nodata=0)
    info = inspect_raster(path)
    pixels, valid = read_scene_window(info, (0, 0, 30, 20))
    assert pixels.shape == (2, 20, 30) and bool(valid.all())
    assert pixels.min() > 0 and pixels.max() < 0.6  # uint16 / 10000
    assert composite(info, None) == (0,)  # two bands: grey from the first
    raw, _ = read_scene_window(info, (0, 0, 30, 20), scale=1.0)  # --option scale=1: values as stored
    np.testing.assert_allclose(raw, pixels * 10000, rtol=1e-5)
    with rasterio.open(path) as ds:
        first = float(ds.read(1)[0, 0])
    _, valid = read_scene_window(info, (0, 0, 30, 20), nodata=first)  # an extra nodata value
    assert not valid[0, 0] and valid.sum() < valid.size


def test_bands_and_composite(
    raster: WriteRaster, backbone: Path, tmp_path: Path, single_thread: None, capsys
):
    path = raster("scene.tif", count=5, height=70, width=90)
    out = tmp_path / "vis"
    args = ["visualize", "--quiet", "--domain", "remote_sensing", "--backbone", str(backbone), str(path)]
    assert (
        main([*args, "--out", str(out), "--region", "10,5,64,40", "--bands", "4,3,2", "--rgb", "2,3,4"]) == 0
    )
    picture = json.loads(capsys.readouterr().out)["pictures"][0]
    assert picture["grid"] == [5, 8] and "bands 4,3,2" in picture["input"]
    assert composite(inspect_raster(path, (4, 3, 2)), (2, 3, 4)) == (2, 1, 0)
    assert main([*args, "--out", str(tmp_path / "v2"), "--bands", "4,3,2", "--rgb", "1,2,3"]) == 1
    assert "band(s) [1] are not among the bands read" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "v3")]) == 1  # five bands for a three-band backbone
    err = capsys.readouterr().err
    assert str(path) in err and "has 5 channels, the backbone takes 3" in err
    assert not (tmp_path / "v2").exists() and not (tmp_path / "v3").exists()


def test_window_outside_or_empty(raster: WriteRaster, backbone: Path, tmp_path: Path, capsys) -> None:
    path = raster("small.tif", count=3, height=20, width=30)
    args = ["visualize", "--quiet", "--domain", "remote_sensing", "--backbone", str(backbone), str(path)]
    assert main([*args, "--out", str(tmp_path / "v"), "--region", "20,0,16,16"]) == 1
    assert "outside the raster" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "v"), "--region", "0,0,30,5"]) == 1  # 5 px < one 8 px patch
    assert "smaller than one 8-pixel patch" in capsys.readouterr().err
    empty = raster("empty.tif", count=3, height=20, width=30, nodata=7, seed=1)
    with rasterio.open(empty, "r+") as ds:
        ds.write(np.full((3, 20, 30), 7, np.uint16))
    assert main([*args[:-1], str(empty), "--out", str(tmp_path / "v")]) == 1
    assert "holds no valid pixel" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
