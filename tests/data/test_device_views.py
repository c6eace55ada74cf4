"""Device views: the worker returns the uint8 tile and per-crop parameters, the device stage makes the crops.

The photometric ops are checked against torchvision's definitions sample by sample (each sample with its own
factors and op order), and the geometric ops against numpy slicing and rotations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from foundation.config import CropsConfig, DataConfig
from foundation.data.device_views import (
    N_GEOMETRIC,
    N_PHOTOMETRIC,
    N_UNIFORMS,
    DeviceMAEView,
    DeviceMultiCropViews,
    DeviceStage,
    Photometric,
    apply_d4,
    apply_photometric,
    augment_on_device,
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


def test_d4_is_the_eight_symmetries_of_numpy() -> None:
    image = np.random.default_rng(2).integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float()
    for d4 in range(8):
        out = apply_d4(x, torch.tensor([d4, (d4 + 3) % 8])).permute(0, 2, 3, 1).numpy()
        for i, v in enumerate((d4, (d4 + 3) % 8)):
            expected = np.rot90(image[i][:, ::-1] if v >= 4 else image[i], v % 4)
            np.testing.assert_array_equal(out[i], expected)


def _geometric(top: int, left: int, h: int, w: int, d4: int = 0) -> list[float]:
    return [top, left, h, w, d4]


def test_device_stage_cuts_boxes_of_the_right_tile_and_normalises() -> None:
    tiles = torch.randint(
        0, 256, (2, 20, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    neutral = _params()
    stage = DeviceStage({"global_crops": 8, "local_crops": 4}, MEAN, STD)
    # crop-major rows: [crop 0 of tile 0, crop 0 of tile 1, crop 1 of tile 0, crop 1 of tile 1]
    boxes = [(3, 5, 8, 8), (0, 0, 8, 8), (12, 16, 8, 8), (6, 2, 8, 8)]
    params = torch.tensor([_geometric(*b) + neutral for b in boxes])
    out = stage({"tile": tiles, "global_crops": params, "local_crops": None})
    assert set(out) == {"global_crops", "local_crops"} and out["local_crops"] is None
    x = tiles.permute(0, 3, 1, 2).float() / 255
    norm = (torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1))
    for r, (top, left, h, w) in enumerate(boxes):
        expected = (x[r % 2, :, top : top + h, left : left + w] - norm[0]) / norm[1]
        torch.testing.assert_close(out["global_crops"][r], expected)  # a box of the output size: exact pixels
    # a 16 px box down to 4 px averages (no aliasing): a constant tile stays constant
    flat = torch.full((1, 16, 16, 3), 100, dtype=torch.uint8)
    small = stage.crops(flat, torch.tensor([_geometric(0, 0, 16, 16) + neutral]), 4)
    torch.testing.assert_close(small, ((100 / 255 - norm[0]) / norm[1]).expand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        stage.crops(tiles.float(), params, 8)


def test_multicrop_views_are_deterministic_and_finish_on_the_device() -> None:
    crops = CropsConfig(global_size=24, local_size=12, n_local=3)
    views = DeviceMultiCropViews(crops, MEAN, STD, rot90=True, solarize=False)
    image = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = views(image, torch.Generator().manual_seed(5))
    b = views(image, torch.Generator().manual_seed(5))
    c = views(image, torch.Generator().manual_seed(6))
    assert torch.equal(a["tile"], torch.from_numpy(image)) and set(a) == {
        "tile",
        "global_crops",
        "local_crops",
    }
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a["global_crops"], c["global_crops"], strict=True))
    assert len(a["global_crops"]) == 2 and len(a["local_crops"]) == 3
    for p in a["global_crops"] + a["local_crops"]:
        top, left, h, w = p[:4].tolist()
        assert top >= 0 and left >= 0 and top + h <= 40 and left + w <= 48 and 0 <= p[4] < 8
    assert all(p[N_GEOMETRIC + 10] == 0 for p in a["global_crops"])  # solarize off
    assert a["global_crops"][0][N_GEOMETRIC + 9] > 0  # the first global crop is always blurred (p = 1)
    batch = views.device_transform(collate_views([a, c]))
    assert "tile" not in batch and batch["global_crops"].dtype == torch.float32
    assert batch["global_crops"].shape == (4, 3, 24, 24) and batch["local_crops"].shape == (6, 3, 12, 12)
    # crop-major order survives: row 1 is sample c's first global crop
    single = views.device_transform(collate_views([c]))
    torch.testing.assert_close(batch["global_crops"][1], single["global_crops"][0])

    no_local = DeviceMultiCropViews(CropsConfig(global_size=24, local_size=12, n_local=0), MEAN, STD)
    batch = no_local.device_transform(collate_views([no_local(image, torch.Generator().manual_seed(0))]))
    assert batch["local_crops"] is None
    with pytest.raises(ValueError, match="uint8"):
        no_local(image.astype(np.float32), torch.Generator())


class _Shift:
    """A per-tile op: adds the sample's own constant to every crop of it."""

    n_params = 1

    def draw(self, u: np.ndarray) -> list[float]:
        return [0.1 * float(u[0])]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return x + params[:, :1, None, None]


def test_tile_ops_are_drawn_once_per_tile_and_applied_to_each_crop() -> None:
    crops = CropsConfig(global_size=16, local_size=8, n_local=2)
    views = DeviceMultiCropViews(crops, MEAN, STD, color=False, tile_ops=[_Shift()])
    image = np.full((32, 32, 3), 128, np.uint8)
    sample = views(image, torch.Generator().manual_seed(0))
    shifts = {float(p[N_GEOMETRIC]) for p in sample["global_crops"] + sample["local_crops"]}
    assert len(shifts) == 1  # one draw for the tile
    mae = DeviceMAEView(16, MEAN, STD, tile_ops=[_Shift()])
    one = mae(image, torch.Generator().manual_seed(0))
    assert one["tile"].shape == (32, 32, 3) and one["image"].shape == (N_GEOMETRIC + 1,)
    out = mae.device_transform(collate_views([one]))["image"]
    assert out.shape == (1, 3, 16, 16)
    shifted = (128 / 255 + float(one["image"][N_GEOMETRIC]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[0, :, 0, 0], shifted)


def test_augment_on_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert augment_on_device(DataConfig(augment_on="device"))
    assert not augment_on_device(DataConfig(augment_on="workers"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert augment_on_device(DataConfig())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not augment_on_device(DataConfig())
    with pytest.raises(ConfigError, match="data.augment_on"):
        DataConfig(augment_on="gpu")
