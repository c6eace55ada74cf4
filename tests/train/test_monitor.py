"""Monitoring during pretraining: kNN of the teacher every eval.every steps, crop grid and PCA pictures in
RUN/images and TensorBoard, and a training stream that monitoring does not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from foundation.config import load_config
from foundation.errors import ConfigError, DataError
from foundation.train.distributed import DistInfo
from foundation.train.engine import pretrain
from foundation.train.monitor import per_sample_views

CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _pretrain(recipe: Path, data: Path, out: Path, *overrides: str) -> Path:
    torch.set_num_threads(1)
    pretrain(load_config(recipe, [f"data.path={data}", *overrides]), out, CPU1, quiet=True)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_knn_and_pictures_every_n_steps_without_changing_training(tiny_recipe, image_folder, tmp_path):
    knn = [f"eval.knn.train={image_folder}", f"eval.knn.val={image_folder}", "eval.every=3"]
    image_dependent = "model.layerscale_init=null"  # LayerScale 1e-5 leaves a 6-step CLS (nearly) image-free
    watched = _pretrain(tiny_recipe, image_folder, tmp_path / "watched", image_dependent, *knn)
    plain = _pretrain(tiny_recipe, image_folder, tmp_path / "plain", image_dependent, "eval.images=false")

    knn_steps = {r["step"]: r["knn/top1"] for r in _records(watched) if "knn/top1" in r}
    assert sorted(knn_steps) == [2, 5] and all(0.0 <= v <= 1.0 for v in knn_steps.values())
    # the same images for train and val: each is its own nearest neighbour, far above chance (1/3)
    assert knn_steps[5] > 0.6
    images = sorted(p.name for p in (watched / "images").iterdir())
    assert images == ["crops_step00000000.png", "pca_step00000003.png", "pca_step00000006.png"]
    for name in images:
        with Image.open(watched / "images" / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not (plain / "images").exists()

    losses = {r["step"]: r["loss"] for r in _records(watched) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in _records(plain) if "loss" in r}
    a, b = (
        load_file(str(watched / "export" / "model.safetensors")),
        load_file(str(plain / "export" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(watched / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"images/crops", "images/pca"} <= set(events.Tags()["images"])
    assert "train/knn/top1" in events.Tags()["scalars"]


def test_mae_encoder_is_monitored(tiny_recipe, image_folder, tmp_path):
    run = _pretrain(
        tiny_recipe, image_folder, tmp_path / "mae", "ssl.method=mae", "ssl.decoder_dim=32", "ssl.decoder_depth=1",
        "ssl.decoder_heads=2", "train.steps=2", f"eval.knn.train={image_folder}", f"eval.knn.val={image_folder}",
    )  # fmt: skip
    assert [r["step"] for r in _records(run) if "knn/top1" in r] == [1]
    assert (run / "images" / "crops_step00000000.png").is_file()


def test_views_are_regrouped_per_sample():
    b = 3
    globals_ = torch.arange(2 * b).float().view(2 * b, 1, 1, 1).expand(-1, 3, 4, 4)
    locals_ = 100 + torch.arange(4 * b).float().view(4 * b, 1, 1, 1).expand(-1, 3, 2, 2)
    views = per_sample_views({"global_crops": globals_, "local_crops": locals_})
    assert len(views) == b and [n for n, _ in views[1]] == ["global 1", "global 2"] + [
        f"local {j}" for j in range(1, 5)
    ]
    # crop-major stacking: sample 1's second global crop is row b + 1, its third local crop row 2b + 1
    assert views[1][1][1][0, 0, 0] == b + 1 and views[1][4][1][0, 0, 0] == 100 + 2 * b + 1
    assert [n for n, _ in per_sample_views({"image": globals_})[0]] == ["MAE view"]


def test_bad_knn_folders_are_refused_before_training(tiny_recipe, image_folder, tmp_path):
    one_class = tmp_path / "one"
    shutil.copytree(image_folder / "discs", one_class / "discs")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((image_folder / "discs").iterdir())[:2]:
        shutil.copy(p, flat / p.name)
    with pytest.raises(DataError, match=r"eval\.knn\.train=.*one.*two or more class"):
        _pretrain(
            tiny_recipe,
            image_folder,
            tmp_path / "r1",
            f"eval.knn.train={one_class}",
            f"eval.knn.val={image_folder}",
        )
    with pytest.raises(DataError, match=r"eval\.knn\.train=.*flat"):
        _pretrain(
            tiny_recipe,
            image_folder,
            tmp_path / "r2",
            f"eval.knn.train={flat}",
            f"eval.knn.val={image_folder}",
        )
    with pytest.raises(ConfigError, match="eval.knn.train and eval.knn.val go together"):
        load_config(None, [f"eval.knn.train={image_folder}"])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
