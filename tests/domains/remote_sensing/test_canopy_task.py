"""``foundation finetune canopy-height`` / ``foundation evaluate canopy-height`` end to end on rasters written
here: training lowers the loss, the model beats a constant predictor, resume is exact, bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import torch
import yaml
from affine import Affine
from rs_testdata import write_raster

from foundation.batch import EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.plotting import is_our_png
from foundation_domains.remote_sensing.canopy.task import CanopyHeightTask

RECIPE = """\
seed: 0
domain: remote_sensing
model: {arch: vit_tiny, patch_size: 16, img_size: 32, in_chans: 4, layerscale_init: null}
data: {num_workers: 0}
optim: {lr: 0.002, lr_scaling: none, warmup_steps: 2, weight_decay: 0.0, weight_decay_end: 0.0,
        layer_decay: 1.0, patch_embed_lr_mult: 1.0, clip_grad: 1.0, freeze_last_layer_steps: 0}
train: {steps: 30, batch_size: 4, checkpoint_every: 10, log_every: 1, eval_every: 15}
task:
  options:
    tile_size: 32
    head: {mode: regression, features: 16}
"""


def _field(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _scene(root: Path, name: str, seed: int, size: int = 64) -> None:
    """4-band float reflectance; height = 25 m x band 1 (a smooth field), a nodata strip in the label."""
    rng = np.random.default_rng(seed)
    veg = _field(rng, size)
    bands = np.stack([veg, 1 - veg, rng.uniform(0, 1, (size, size)), veg * 0.5]).astype(np.float32)
    write_raster(root / "images" / f"{name}.tif", bands)
    heights = (25 * veg)[None].astype(np.float32)
    heights[:, :, :6] = -9999
    write_raster(root / "labels" / f"{name}.tif", heights, nodata=-9999)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("canopy")
    for i in range(3):
        _scene(root / "train", f"t{i}", seed=i)
    _scene(root / "val", "v0", seed=10)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _finetune(data: Path, out: Path, *extra: str) -> int:
    train = data / "train"
    argv = ["finetune", "canopy-height", "--random-init", "--config", str(data / "recipe.yaml")]
    argv += ["--out", str(out), "--images", str(train / "images"), "--labels", str(train / "labels")]
    return main([*argv, "--quiet", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _constant_mae(labels: Path) -> float:
    values = []
    for f in sorted(labels.glob("*.tif")):
        with rasterio.open(f) as ds:
            values.append(ds.read(1, masked=True).compressed())
    y = np.concatenate(values)
    return float(np.abs(y - np.median(y)).mean())


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory, single_thread) -> Path:
    run = tmp_path_factory.mktemp("runs") / "chm"
    val = ["--val-images", str(data / "val" / "images"), "--val-labels", str(data / "val" / "labels")]
    assert _finetune(data, run, *val) == 0
    return run


def test_finetune_learns_and_stores_what_inference_needs(trained, single_thread):
    records = _records(trained)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    val = [r for r in records if "val/mae" in r]
    assert [r["step"] for r in val] == [14, 29]
    assert {"val/rmse", "val/r2", "val/bias", "val/tree_cover_iou"} <= set(val[-1])

    meta = CanopyHeightTask().load(trained).meta.to_dict()
    keys = {"head", "bands", "scale", "mean", "std", "in_chans", "tile_size", "gsd", "max_height"}
    assert set(meta) == keys
    assert meta["in_chans"] == 4 and meta["tile_size"] == 32 and meta["gsd"] == 10.0 and meta["bands"] is None
    assert meta["scale"] == 1.0 and meta["max_height"] == 96.0 and len(meta["mean"]) == 4
    assert meta["head"]["mode"] == "regression"


def test_evaluate_prints_metrics_and_beats_a_constant(trained, data, capsys, tmp_path, single_thread):
    argv = ["evaluate", "canopy-height", "--checkpoint", str(trained), "--quiet"]
    argv += [
        "--out",
        str(tmp_path / "m.json"),
        "--images",
        str(data / "val" / "images"),
        "--labels",
        str(data / "val" / "labels"),
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"mae", "rmse", "r2", "block_r2", "bias", "height_bins", "tree_cover_iou", "pixels", "skipped"}
    assert keys <= set(result)
    assert result["pixels"] == 64 * 58 and result["skipped"] == []
    assert result["mae"] < 0.7 * _constant_mae(data / "val" / "labels")
    assert result["r2"] > 0.3
    written = json.loads((tmp_path / "m.json").read_text())
    assert written.pop("foundation_output") == "canopy-height-metrics" and written == result
    plots = result["plots"]
    assert plots == {
        "density": str(tmp_path / "m_density.png"),
        "height_bins": str(tmp_path / "m_height_bins.png"),
    }
    assert all(is_our_png(Path(p)) for p in plots.values())
    assert main(argv) == 0  # an earlier metrics file (and plots) of ours is replaced
    Path(plots["density"]).write_bytes(b"my own picture")
    assert main(argv) == 1  # a file that is not our plot is left alone, before any work
    assert "m_density.png exists and is not a plot of ours" in capsys.readouterr().err
    assert Path(plots["density"]).read_bytes() == b"my own picture"


def test_finetune_resumes_exactly(data, tmp_path, single_thread):
    short = ["train.steps=4", "train.checkpoint_every=2", "train.eval_every=0"]
    assert _finetune(data, tmp_path / "full", *short) == 0
    assert _finetune(data, tmp_path / "half", *short, "train.steps=2") == 0
    (tmp_path / "half" / "model.pt").unlink()
    assert _finetune(data, tmp_path / "half", *short) == 0
    full = {r["step"]: r["loss"] for r in _records(tmp_path / "full") if "loss" in r}
    half = {r["step"]: r["loss"] for r in _records(tmp_path / "half") if "loss" in r}
    assert half == pytest.approx(full, rel=1e-5)


def test_binned_head_with_a_frozen_backbone_trains(data, tmp_path, single_thread):
    extra = ["train.steps=3", "train.eval_every=0", "task.freeze_backbone=true"]
    assert _finetune(data, tmp_path / "bins", *extra, "task.options.head={mode: bins, bins: 8}") == 0
    model = CanopyHeightTask().load(tmp_path / "bins")
    net, meta = model.net, model.meta
    assert meta.head["bins"] == 8 and net.head.out[-1].out_channels == 8


def test_band_count_that_does_not_fit_the_backbone_is_named(data, tmp_path, capsys):
    assert _finetune(data, tmp_path / "run", "--bands", "1,2,3") == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert "t0.tif: gives 3 bands but the random-init backbone (set model.in_chans) takes 4" in err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_label_off_its_image_stops_finetune_naming_both(data, tmp_path, capsys):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    (tmp_path / "images" / "a.tif").write_bytes((data / "train" / "images" / "t0.tif").read_bytes())
    with rasterio.open(data / "train" / "labels" / "t0.tif") as src:
        profile = dict(src.profile, transform=Affine(10, 0, 900_000, 0, -10, 5_000_000))
        with rasterio.open(tmp_path / "labels" / "a.tif", "w", **profile) as dst:
            dst.write(src.read())
    argv = ["finetune", "canopy-height", "--random-init", "--config", str(data / "recipe.yaml")]
    argv += ["--out", str(tmp_path / "run"), "--images", str(tmp_path / "images")]
    argv += ["--labels", str(tmp_path / "labels")]
    assert main(argv) == EXIT_NOTHING_DONE
    err = capsys.readouterr().err
    assert "labels/a.tif: does not overlap its image" in err and "images/a.tif" in err


def test_evaluate_skips_a_broken_pair_reports_it_and_fails(trained, data, tmp_path, capsys, single_thread):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for name in ("good", "bad"):
        (tmp_path / "images" / f"{name}.tif").write_bytes((data / "val" / "images" / "v0.tif").read_bytes())
    (tmp_path / "labels" / "good.tif").write_bytes((data / "val" / "labels" / "v0.tif").read_bytes())
    write_raster(tmp_path / "labels" / "bad.tif", np.ones((1, 8, 8), np.float32), crs="EPSG:32634")
    argv = ["evaluate", "canopy-height", "--checkpoint", str(trained), "--quiet"]
    argv += ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels")]
    assert main(argv) == EXIT_SOME_SKIPPED  # the others' metrics are printed; one pair was skipped
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pixels"] == 64 * 58 and len(result["skipped"]) == 1
    assert result["done"] == result["images"] == 1
    assert "bad.tif" in result["skipped"][0]["reason"]


def test_evaluate_refuses_images_with_another_band_count(trained, data, tmp_path, capsys):
    write_raster(tmp_path / "images" / "v0.tif", np.ones((3, 32, 32), np.float32))
    argv = ["evaluate", "canopy-height", "--checkpoint", str(trained), "--quiet"]
    argv += ["--images", str(tmp_path / "images"), "--labels", str(data / "val" / "labels")]
    assert main(argv) == EXIT_NOTHING_DONE
    assert "v0.tif: gives 3 bands but the model takes 4" in capsys.readouterr().err


def _export(tmp_path: Path, chans: int) -> Path:
    """A (random) backbone exported with its pretraining statistics, as `foundation export` writes it."""
    from foundation.export import export_backbone
    from foundation.models.vit import build_vit

    args = dict(arch="vit_tiny", in_chans=chans, img_size=32, patch_size=16, reg_tokens=1)
    mean, std = [0.1 * (i + 1) for i in range(chans)], [0.5] * chans
    return export_backbone(build_vit(**args), args, tmp_path / f"export{chans}", mean=mean, std=std)


def test_a_pretrained_backbone_brings_its_statistics(data, tmp_path, capsys, single_thread):
    train = data / "train"
    argv = ["finetune", "canopy-height", "--config", str(data / "recipe.yaml"), "--quiet"]
    argv += ["--images", str(train / "images"), "--labels", str(train / "labels")]
    argv += ["train.steps=2", "train.eval_every=0"]
    assert main([*argv, "--backbone", str(_export(tmp_path, 4)), "--out", str(tmp_path / "run")]) == 0
    model = CanopyHeightTask().load(tmp_path / "run")
    net, meta = model.net, model.meta
    assert meta.mean == pytest.approx([0.1, 0.2, 0.3, 0.4]) and meta.std == (0.5,) * 4
    assert net.backbone.reg_token is not None

    argv += ["--backbone", str(_export(tmp_path, 3)), "--out", str(tmp_path / "run3")]
    assert main(argv) == EXIT_NOTHING_DONE
    assert "t0.tif: gives 4 bands but the backbone takes 3" in capsys.readouterr().err


def test_saved_config_reproduces_the_run_from_another_folder(data, tmp_path, monkeypatch, single_thread):
    """RUN/config.yaml holds the images, labels, bands and backbone choice (absolute paths): `finetune
    canopy-height --config RUN/config.yaml` alone, from another working directory, gives the same weights."""
    monkeypatch.chdir(data)  # relative flags: stored resolved
    argv = ["finetune", "canopy-height", "--random-init", "--config", "recipe.yaml", "--quiet"]
    argv += ["--images", "train/images", "--labels", "train/labels", "--bands", "1,2,3,4"]
    short = ["train.steps=3", "train.eval_every=0"]
    assert main([*argv, "--out", str(tmp_path / "first"), *short]) == 0
    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert saved["task"]["inputs"]["images"] == str(data / "train" / "images")
    assert saved["task"]["random_init"] is True and saved["task"]["options"]["bands"] == "1,2,3,4"
    monkeypatch.chdir(tmp_path)
    again = ["finetune", "canopy-height", "--config", str(tmp_path / "first" / "config.yaml"), "--quiet"]
    assert main([*again, "--out", str(tmp_path / "again")]) == 0
    first, second = (torch.load(tmp_path / r / "model.pt", weights_only=True) for r in ("first", "again"))
    assert first["task_meta"] == second["task_meta"]
    assert all(torch.equal(first["net"][k], second["net"][k]) for k in first["net"])
    losses = [[r["loss"] for r in _records(tmp_path / r) if "loss" in r] for r in ("first", "again")]
    assert losses[0] == losses[1]
