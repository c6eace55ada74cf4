"""Training views: the per-sample dataset is a pure function of the index, crop-major collation, seeded crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.config import CropsConfig
from foundation.data.image_folder import ImageFolder, ImageSampleSource
from foundation.data.seeding import generator_for
from foundation.data.stream import SSLViewDataset, collate_views
from foundation.data.views import EvalView, MAEView, MultiCropViews, to_chw_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def crops_cfg(n_local: int = 3) -> CropsConfig:
    return CropsConfig(global_size=32, local_size=16, n_local=n_local)


def picture(seed: int = 0, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path: Path) -> ImageFolder:
    for i in range(4):
        Image.fromarray(picture(i)).save(tmp_path / f"{i}.png")
    return ImageFolder.scan(tmp_path)


def assert_views_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, list):
            assert len(va) == len(vb)
            for x, y in zip(va, vb, strict=True):
                assert torch.equal(x, y), key
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key


def test_ssl_view_dataset_item_identical_across_instances(folder: ImageFolder) -> None:
    transform = MultiCropViews(crops_cfg(), MEAN, STD)

    def make() -> SSLViewDataset:
        views = lambda sample, g: transform(sample["image"], g)  # noqa: E731
        extras = lambda v, g: {"noise": torch.rand(3, generator=g)}  # noqa: E731
        return SSLViewDataset(ImageSampleSource(folder, seed=0), views, seed=5, extras=extras)

    a, b = make(), make()
    for i in (0, 3, 11):
        assert_views_equal(a[i], b[i])
    assert_views_equal(a[3], a[3])  # reading again gives the same
    assert not torch.equal(a[0]["global_crops"][0], a[4]["global_crops"][0])  # same file, another draw
    assert not torch.equal(a[0]["noise"], a[1]["noise"])
    assert len(a) >= 2**62


def test_ssl_view_dataset_depends_on_seed(folder: ImageFolder) -> None:
    transform = MAEView(32, MEAN, STD)

    def views(sample: dict, g: torch.Generator) -> dict:
        return transform(sample["image"], g)

    a = SSLViewDataset(ImageSampleSource(folder, seed=0), views, seed=1)
    b = SSLViewDataset(ImageSampleSource(folder, seed=0), views, seed=2)
    assert not torch.equal(a[0]["image"], b[0]["image"])


def test_collate_views_crop_major() -> None:
    def sample(k: int) -> dict:
        return {
            "global_crops": [torch.full((1, 2, 2), 10.0 * k + c) for c in range(2)],
            "local_crops": [torch.full((1, 1, 1), 100.0 * k + c) for c in range(3)],
            "mask": torch.full((4,), k),
            "path": f"p{k}",
        }

    batch = collate_views([sample(k) for k in range(3)])
    g = batch["global_crops"]
    assert g.shape == (6, 1, 2, 2)
    # crop 0 of every sample, then crop 1 of every sample
    assert g[:, 0, 0, 0].tolist() == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
    loc = batch["local_crops"]
    assert loc.shape == (9, 1, 1, 1)
    assert loc.flatten().tolist() == [0.0, 100.0, 200.0, 1.0, 101.0, 201.0, 2.0, 102.0, 202.0]
    assert batch["mask"].shape == (3, 4) and batch["mask"][:, 0].tolist() == [0, 1, 2]
    assert batch["path"] == ["p0", "p1", "p2"]


def test_collate_views_empty_local_crops() -> None:
    batch = collate_views([{"global_crops": [torch.zeros(1)] * 2, "local_crops": []} for _ in range(2)])
    assert batch["local_crops"] is None
    assert batch["global_crops"].shape == (4, 1)


def test_multicrop_deterministic_per_generator_seed() -> None:
    views = MultiCropViews(crops_cfg(), MEAN, STD)
    image = picture(0)
    a = views(image, torch.Generator().manual_seed(42))
    b = views(image, torch.Generator().manual_seed(42))
    c = views(image, torch.Generator().manual_seed(43))
    assert_views_equal(a, b)
    assert len(a["global_crops"]) == 2 and len(a["local_crops"]) == 3
    assert a["global_crops"][0].shape == (3, 32, 32) and a["local_crops"][0].shape == (3, 16, 16)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])  # two different crops
    # independent of the global RNG
    torch.manual_seed(0)
    d = views(image, torch.Generator().manual_seed(42))
    torch.manual_seed(1)
    assert_views_equal(a, d)


def test_multicrop_float_multispectral_without_colour_ops() -> None:
    crops = crops_cfg(n_local=1)
    views = MultiCropViews(
        crops, (0.5,) * 5, (0.25,) * 5, color=False, solarize=False, rot90=True, max_pixel_value=1.0
    )
    image = np.random.default_rng(0).random((40, 40, 5), dtype=np.float32)
    out = views(image, torch.Generator().manual_seed(0))
    assert out["global_crops"][0].shape == (5, 32, 32)
    assert out["local_crops"][0].shape == (5, 16, 16)
    # (x - 0.5) / 0.25 for uniform x in [0, 1]: mean about 0 (bicubic ringing may leave [-2, 2] a little)
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.mean().abs() < 0.5
        assert crop.abs().max() < 4


def test_mae_view_deterministic() -> None:
    view = MAEView(32, MEAN, STD)
    image = picture(1)
    a = view(image, torch.Generator().manual_seed(0))["image"]
    b = view(image, torch.Generator().manual_seed(0))["image"]
    c = view(image, torch.Generator().manual_seed(1))["image"]
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_view_resize_and_centre_crop() -> None:
    view = EvalView(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, 12:28] = 255  # the centre half of the width
    out = view(image)
    assert out.shape == (3, 16, 16)
    assert torch.equal(view(image), out)
    # shorter side -> 16 (16 x 32); the white band 12..28 of 40 becomes 9.6..22.4 of 32, and the centre crop
    # (columns 8..24) puts it at 1.6..14.4: dark edge columns, white middle
    assert out[:, :, 0].max() < 0.05 and out[:, :, 15].max() < 0.05
    assert out[:, :, 3:13].min() > 0.99


def test_to_chw_tensor() -> None:
    hwc = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    t = to_chw_tensor(hwc)
    assert t.dtype == torch.float32 and t.shape == (3, 2, 4)
    assert t[1, 0, 2].item() == hwc[0, 2, 1]
    assert to_chw_tensor(np.zeros((5, 6), dtype=np.float32)).shape == (1, 5, 6)


def test_generator_drives_source_views_and_extras(folder: ImageFolder) -> None:
    """Sample i uses generator_for(seed, i) for everything, in that order."""
    transform = MAEView(32, MEAN, STD)
    seen = {}

    def views(sample: dict, g: torch.Generator) -> dict:
        return transform(sample["image"], g)

    def extras(v: dict, g: torch.Generator) -> dict:
        seen["state"] = g.get_state()
        return {}

    ds = SSLViewDataset(ImageSampleSource(folder, seed=0), views, seed=9, extras=extras)
    ds[2]
    g = generator_for(9, 2)
    transform(ImageSampleSource(folder, seed=0).sample(2, g)["image"], g)
    assert torch.equal(seen["state"], g.get_state())


def test_blur_scales_with_the_crop_and_is_dinov2_s_at_its_sizes() -> None:
    """DINOv2's 0.1-2.0 px at its 224 px global and 96 px local crops, the same relative blur at smaller crops
    (never more than DINOv2's at larger ones), and the same range on the CPU and the device pipelines."""
    from foundation.data.device_views import DeviceMultiCropViews
    from foundation.data.views import blur_sigma

    assert blur_sigma(224, "global") == pytest.approx((0.1, 2.0))
    assert blur_sigma(96, "local") == pytest.approx((0.1, 2.0))
    assert blur_sigma(518, "global") == pytest.approx((0.1, 2.0))
    assert blur_sigma(32, "global") == pytest.approx((0.1 / 7, 2.0 / 7))
    assert blur_sigma(16, "local") == pytest.approx((0.1 / 6, 2.0 / 6))
    crops = CropsConfig(global_size=32, local_size=16, n_local=2)
    cpu = MultiCropViews(crops, [0.5] * 3, [0.25] * 3)
    sigma_of = {t.__class__.__name__: t for t in cpu.global1.transforms}["GaussianBlur"].sigma_limit
    assert tuple(sigma_of) == pytest.approx(blur_sigma(32, "global"))
    device = DeviceMultiCropViews(crops, [0.5] * 3, [0.25] * 3)
    assert device.global1.blur_sigma == device.global2.blur_sigma == pytest.approx(blur_sigma(32, "global"))
    assert device.local.blur_sigma == pytest.approx(blur_sigma(16, "local"))
    rng = np.random.default_rng(0)
    drawn = np.array([device.local.draw(row) for row in rng.random((2000, 64))])
    blurred = drawn[drawn[:, 9] > 0, 9]
    assert blurred.min() >= 0.1 / 6 and blurred.max() <= 2.0 / 6
