"""``foundation pretrain --domain remote_sensing`` end to end, in-process, on rasters and on the embedded scene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rs_testdata import random_bands, write_raster

from foundation.batch import EXIT_NOTHING_DONE
from foundation.cli import main
from foundation.config import RECIPES
from foundation.train.checkpoint import latest_checkpoint, load_checkpoint

QUICK = [
    "train.steps=2",
    "train.batch_size=4",
    "train.checkpoint_every=2",
    "data.num_workers=0",
    "data.crops.n_local=2",
    "data.options.stats_windows=8",
]


def run(capsys, *argv: str) -> dict:
    assert main(["pretrain", "--domain", "remote_sensing", "--quiet", *argv, *QUICK]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def check_run(out: Path, channels: int) -> dict:
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == 2 and state["domain"] == "remote_sensing"
    assert state["backbone_args"]["in_chans"] == channels
    norm = state["normalization"]
    assert len(norm["mean"]) == len(norm["std"]) == channels and min(norm["std"]) > 0
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["model_args"]["in_chans"] == channels
    assert config["pretrained_cfg"]["mean"] == pytest.approx(norm["mean"])  # statistics ship with the weights
    return norm


def test_pretrain_on_a_folder_of_rasters(tmp_path: Path, capsys) -> None:
    data = tmp_path / "rasters"
    scene = random_bands(4, 150, 170, "uint16", seed=1)
    scene[:, :, :60] = 0  # nodata border
    write_raster(data / "t33/scene.tif", scene, nodata=0)
    write_raster(data / "t32/other.tif", random_bands(4, 97, 101, "uint16", seed=2), crs="EPSG:32632")
    write_raster(data / "t31/small.tif", random_bands(4, 40, 50, "uint16", seed=3), crs="EPSG:4326", res=1e-4)
    result = run(capsys, "--data", str(data), "--out", str(tmp_path / "run"))
    assert Path(result["export"]) == tmp_path / "run" / "export"
    norm = check_run(tmp_path / "run", 4)
    valid = scene[:, :, 60:].reshape(4, -1) / 10000
    assert all(0 < m < 0.6 for m in norm["mean"])  # reflectance-like units, nodata left out
    assert abs(norm["mean"][0] - valid[0].mean()) < 0.05


def test_pretrain_band_selection_and_mae(tmp_path: Path, capsys) -> None:
    write_raster(tmp_path / "s2.tif", random_bands(12, 96, 96, "uint16"))
    config = RECIPES / "remote_sensing" / "mae_tiny.yaml"
    args = ["--data", str(tmp_path / "s2.tif"), "--out", str(tmp_path / "mae"), "--config", str(config)]
    run(capsys, *args, "data.options.bands=4,3,2,8")
    check_run(tmp_path / "mae", 4)


def test_pretrain_without_data_uses_the_embedded_scene(tmp_path: Path, capsys) -> None:
    run(capsys, "--out", str(tmp_path / "sample"))
    norm = check_run(tmp_path / "sample", 6)
    assert np.argmax(norm["mean"]) == 4  # the NIR band is the brightest over vegetation


def test_pretrain_bad_data_exits_with_the_file_named(tmp_path: Path, capsys) -> None:
    data = tmp_path / "mixed"
    write_raster(data / "a.tif", random_bands(4, 40, 40, "uint16"))
    write_raster(data / "b.tif", random_bands(3, 40, 40, "uint16"))
    assert (
        main(
            [
                "pretrain",
                "--domain",
                "remote_sensing",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "r"),
                *QUICK,
            ]
        )
        == EXIT_NOTHING_DONE
    )
    assert f"{data / 'b.tif'}: gives 3 bands" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing half-made left behind
