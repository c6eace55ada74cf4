"""Device views: uint8 crops and parameters from the worker, photometric ops batched on the device.

The photometric ops are checked against torchvision's definitions sample by sample (each sample with its own
factors and op order), and the geometric half against numpy references.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from foundation.config import CropsConfig, DataConfig
from foundation.data.device_views import (
    N_PHOTOMETRIC,
    N_UNIFORMS,
    DeviceMAEView,
    DeviceMultiCropViews,
    DeviceStage,
    Photometric,
    apply_photometric,
    augment_on_device,
    cut_crop,
    random_resized_box,
)
from foundation.data.stream import collate_views
from foundation.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _params(b=1.0, c=1.0, s=1.0, h=0.0, order=(0, 1, 2, 3), gray=0, sigma=0.0, solarize=0) -> list[float]:
    return [b, c, s, h, *order, gray, sigma, solarize]


def _reference(x: torch.Tensor, p: list[float]) -> torch.Tensor:
    """One sample through torchvision's functional ops, in the sample's order."""
    ops = [
        lambda y: F.adjust_brightness(y, p[0]),
        lambda y: F.adjust_contrast(y, p[1]),
        lambda y: F.adjust_saturation(y, p[2]),
        lambda y: F.adjust_hue(y, p[3]),
    ]
    for k in p[4:8]:
        x = ops[int(k)](x)
    if p[8]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p[9]:
        x = F.gaussian_blur(x, [9, 9], [p[9], p[9]])
    if p[10]:
        x = torch.where(x >= 0.5, 1 - x, x)
    return x


def test_photometric_ops_match_torchvision_per_sample() -> None:
    x = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    params = [
        _params(),  # untouched
        _params(1.3, 0.7, 1.2, 0.05, order=(3, 2, 1, 0)),
        _params(0.8, 1.4, 0.6, -0.08, order=(1, 3, 0, 2), sigma=1.5),
        _params(gray=1, solarize=1),
        _params(1.1, 1.0, 1.0, 0.0, order=(2, 0, 3, 1), sigma=0.4, solarize=1),
    ]
    out = apply_photometric(x.clone(), torch.tensor(params))
    for i, p in enumerate(params):
        torch.testing.assert_close(out[i], _reference(x[i], p), atol=2e-4, rtol=0)
    torch.testing.assert_close(out[0], x[0])


def test_photometric_draws_follow_the_probabilities() -> None:
    rng = np.random.default_rng(0)
    u = rng.random((4000, N_UNIFORMS - 23))
    never = np.array([Photometric().draw(row) for row in u[:50]])
    assert (never[:, :4] == [1, 1, 1, 0]).all() and (never[:, 8:] == 0).all()
    recipe = Photometric((0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    drawn = np.array([recipe.draw(row) for row in u])
    assert len(drawn[0]) == N_PHOTOMETRIC
    jittered = (drawn[:, :4] != [1, 1, 1, 0]).any(axis=1)
    assert abs(jittered.mean() - 0.8) < 0.03 and abs(drawn[:, 8].mean() - 0.2) < 0.03
    assert abs((drawn[:, 9] > 0).mean() - 0.5) < 0.03 and abs(drawn[:, 10].mean() - 0.2) < 0.03
    assert drawn[jittered, 0].min() >= 0.6 and drawn[jittered, 0].max() <= 1.4
    assert np.abs(drawn[jittered, 3]).max() <= 0.1
    blurred = drawn[drawn[:, 9] > 0, 9]
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0
    assert all(sorted(row) == [0, 1, 2, 3] for row in drawn[:, 4:8].astype(int).tolist())


def test_random_resized_box_stays_inside_with_the_drawn_area_and_ratio() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        top, left, h, w = random_resized_box(rng.random(23), 60, 80, (0.1, 0.6))
        assert top >= 0 and top + h <= 60 and left >= 0 and left + w <= 80
        assert 0.1 * 4800 * 0.85 <= h * w <= 0.6 * 4800 * 1.15
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    # no try fits (area fraction 1 on a very wide image): the largest centred box with the widest ratio
    assert random_resized_box(np.full(23, 0.99), 10, 100, (1.0, 1.0)) == (0, 43, 10, 13)


def test_cut_crop_resizes_and_applies_the_eight_symmetries() -> None:
    image = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for d4 in range(8):
        out = cut_crop(image, (0, 5, 30, 30), 30, d4)
        np.testing.assert_array_equal(
            out, np.rot90(image[:, 5:35][:, ::-1] if d4 >= 4 else image[:, 5:35], d4 % 4)
        )
        assert out.flags["C_CONTIGUOUS"]
    small = cut_crop(image[:, :, :1], (0, 0, 30, 40), 8, 0)
    assert small.shape == (8, 8, 1) and small.dtype == np.uint8


def test_device_stage_normalises_and_consumes_the_parameters() -> None:
    crops = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8)
    neutral = torch.tensor([_params()] * 4)
    stage = DeviceStage(("global_crops", "local_crops"), MEAN, STD)
    out = stage(
        {
            "global_crops": crops,
            "global_crops_params": neutral,
            "local_crops": None,
            "local_crops_params": None,
        }
    )
    expected = (crops.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out["global_crops"], expected)
    assert set(out) == {"global_crops", "local_crops"} and out["local_crops"] is None
    with pytest.raises(ValueError, match="uint8"):
        stage.images(crops.float(), neutral)


def test_multicrop_views_are_deterministic_and_finish_on_the_device() -> None:
    crops = CropsConfig(global_size=24, local_size=12, n_local=3)
    views = DeviceMultiCropViews(crops, MEAN, STD, rot90=True, solarize=False)
    image = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = views(image, torch.Generator().manual_seed(5))
    b = views(image, torch.Generator().manual_seed(5))
    c = views(image, torch.Generator().manual_seed(6))
    for key in ("global_crops", "local_crops", "global_crops_params", "local_crops_params"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a["global_crops"], c["global_crops"], strict=True))
    assert [t.shape for t in a["global_crops"]] == [(24, 24, 3)] * 2
    assert [t.shape for t in a["local_crops"]] == [(12, 12, 3)] * 3
    assert all(p[10] == 0 for p in a["global_crops_params"])  # solarize off
    assert a["global_crops_params"][0][9] > 0  # the first global crop is always blurred (p = 1)
    batch = views.device_transform(collate_views([a, c]))
    assert batch["global_crops"].shape == (4, 3, 24, 24) and batch["local_crops"].shape == (6, 3, 12, 12)
    assert batch["global_crops"].dtype == torch.float32 and "global_crops_params" not in batch
    # crop-major order survives: row 1 is sample c's first global crop
    single = views.device_transform(collate_views([c]))
    torch.testing.assert_close(batch["global_crops"][1], single["global_crops"][0])

    no_local = DeviceMultiCropViews(CropsConfig(global_size=24, local_size=12, n_local=0), MEAN, STD)
    batch = no_local.device_transform(collate_views([no_local(image, torch.Generator().manual_seed(0))]))
    assert batch["local_crops"] is None


class _Shift:
    """A per-tile op: adds the sample's own constant to every crop of it."""

    n_params = 1

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(1, generator=generator) * 0.1

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return x + params[:, :1, None, None]


def test_tile_ops_are_drawn_once_per_tile_and_applied_to_each_crop() -> None:
    crops = CropsConfig(global_size=16, local_size=8, n_local=2)
    views = DeviceMultiCropViews(crops, MEAN, STD, color=False, tile_ops=[_Shift()])
    image = np.full((32, 32, 3), 128, np.uint8)
    sample = views(image, torch.Generator().manual_seed(0))
    shifts = {float(p[0]) for p in sample["global_crops_params"] + sample["local_crops_params"]}
    assert len(shifts) == 1  # one draw for the tile
    mae = DeviceMAEView(16, MEAN, STD, tile_ops=[_Shift()])
    one = mae(image, torch.Generator().manual_seed(0))
    assert one["image"].shape == (16, 16, 3) and one["image_params"].shape == (1,)
    out = mae.device_transform(collate_views([one]))["image"]
    blur_free = (128 / 255 + float(one["image_params"][0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[0, :, 0, 0], blur_free)


def test_augment_on_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert augment_on_device(DataConfig(augment_on="device"))
    assert not augment_on_device(DataConfig(augment_on="workers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert augment_on_device(DataConfig())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not augment_on_device(DataConfig())
    with pytest.raises(ConfigError, match="data.augment_on"):
        DataConfig(augment_on="gpu")
