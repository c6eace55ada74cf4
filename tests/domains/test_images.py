"""The built-in ``images`` domain: listing, decoding, the sample stream, views and the eval dataset."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.config import load_config
from foundation.data.image_folder import ImageFolder, ImageSampleSource, read_rgb
from foundation.errors import DataError
from foundation_domains.images import ImagesDomain

IMAGENET_LOW = (0 - 0.485) / 0.229  # smallest normalised value a uint8 image can give
IMAGENET_HIGH = (1 - 0.406) / 0.225  # largest


def write_rgb(path: Path, seed: int, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for c, cls in enumerate(("cats", "dogs")):
        for i in range(3):
            write_rgb(root / cls / f"{cls}_{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    for i in range(5):
        write_rgb(root / f"img_{i}.png", seed=100 + i)
    return root


def small_cfg(*extra: str):
    return load_config(
        overrides=[
            "model.arch=vit_tiny",
            "model.patch_size=8",
            "model.img_size=32",
            "data.crops.global_size=32",
            "data.crops.local_size=16",
            "data.crops.n_local=3",
            *extra,
        ]
    )


# -- ImageFolder -----------------------------------------------------------------------------------------


def test_scan_class_subfolders(labelled: Path) -> None:
    (labelled / "notes.txt").write_text("not an image")
    folder = ImageFolder.scan(labelled)
    assert folder.classes == ("cats", "dogs")
    assert len(folder) == 6
    assert [p.name for p in folder.files] == [f"cats_{i}.png" for i in range(3)] + [
        f"dogs_{i}.png" for i in range(3)
    ]
    assert folder.labels == (0, 0, 0, 1, 1, 1)
    assert folder.root == labelled


def test_scan_is_recursive_and_case_insensitive(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_rgb(root / "a" / "deep" / "deeper" / "x.png", 1)
    write_rgb(root / "a" / "y.PNG", 2)
    write_rgb(root / "top.png", 3)
    folder = ImageFolder.scan(str(root))
    assert sorted(p.name for p in folder.files) == ["top.png", "x.png", "y.PNG"]
    labels = {p.name: folder.classes[lab] for p, lab in zip(folder.files, folder.labels, strict=True)}
    assert labels == {"x.png": "a", "y.PNG": "a", "top.png": ""}


def test_scan_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(f"'{empty}' has no images")):
        ImageFolder.scan(empty)
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=re.escape(f"'{missing}' does not exist")):
        ImageFolder.scan(missing)
    a_file = write_rgb(tmp_path / "single.png", 0)
    with pytest.raises(DataError, match=re.escape(f"'{a_file}' is not a folder")):
        ImageFolder.scan(a_file)


# -- read_rgb --------------------------------------------------------------------------------------------


def test_read_rgb_plain(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, arr)


def test_read_rgb_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[1, 1, 3] = 255  # opaque
    rgba[2, 2, 3] = 128  # half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (10, 20, 30)
    assert all(10 < v < 255 for v in out[2, 2])  # a blend of colour and white


def test_read_rgb_grayscale_and_la(tmp_path: Path) -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    la = np.stack([gray, np.zeros_like(gray)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_rgb(tmp_path / "la.png")
    assert out.shape == (5, 6, 3) and (out == 255).all()


def test_read_rgb_16bit(tmp_path: Path) -> None:
    arr = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    out = read_rgb(tmp_path / "d.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # stretched to the full range
    assert (np.diff(out[..., 0].reshape(-1).astype(int)) >= 0).all()  # order kept


def test_read_rgb_corrupt_raises_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match="x.png: cannot decode image"):
        read_rgb(bad)


# -- ImageSampleSource -----------------------------------------------------------------------------------


def test_sample_source_skips_corrupt_file(flat: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = flat / "x.png"
    bad.write_bytes(b"\x00garbage\xff" * 50)
    folder = ImageFolder.scan(flat)
    assert bad in folder.files
    source = ImageSampleSource(folder, seed=0)
    n = len(folder)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="foundation.data.image_folder"):
        samples = [source.sample(i, g) for i in range(n)]
    assert all(s["path"] != str(bad) for s in samples)
    assert all(s["image"].shape == (48, 40, 3) and s["image"].dtype == np.uint8 for s in samples)
    # the broken file's turn goes to the next index of the stream
    expected = [source.path_at(i + 1) if source.path_at(i) == bad else source.path_at(i) for i in range(n)]
    assert [s["path"] for s in samples] == [str(p) for p in expected]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # named once, however often it is hit
    assert "x.png" in warnings[0].getMessage()
    assert source.broken == {bad}


def test_sample_source_all_broken(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(2):
        (root / f"b{i}.png").write_bytes(b"nope")
    source = ImageSampleSource(ImageFolder.scan(root), seed=0)
    with pytest.raises(DataError, match="could be decoded"):
        source.sample(0, torch.Generator())


def test_sample_source_deterministic(flat: Path) -> None:
    folder = ImageFolder.scan(flat)
    a, b = ImageSampleSource(folder, seed=3), ImageSampleSource(folder, seed=3)
    assert [a.path_at(i) for i in range(20)] == [b.path_at(i) for i in range(20)]
    s1 = a.sample(7, torch.Generator())
    s2 = b.sample(7, torch.Generator())
    assert s1["path"] == s2["path"]
    np.testing.assert_array_equal(s1["image"], s2["image"])
    other = ImageSampleSource(folder, seed=4)
    assert [a.path_at(i) for i in range(20)] != [other.path_at(i) for i in range(20)]


def test_each_epoch_visits_every_file_once(flat: Path) -> None:
    folder = ImageFolder.scan(flat)
    source = ImageSampleSource(folder, seed=0)
    n = len(folder)
    orders = []
    for epoch in range(4):
        paths = [source.path_at(i) for i in range(epoch * n, (epoch + 1) * n)]
        assert sorted(paths) == sorted(folder.files)
        orders.append(paths)
    assert len({tuple(o) for o in orders}) > 1  # epochs are reshuffled


# -- views and eval data ---------------------------------------------------------------------------------


def test_dinov2_transform_shapes_and_normalisation(flat: Path) -> None:
    cfg = small_cfg()
    dom = ImagesDomain()
    source, spec = dom.sample_source(str(flat), cfg)
    assert (spec.channels, spec.spatial_dims, spec.band_names) == (3, 2, ("red", "green", "blue"))
    transform = dom.ssl_transform(cfg, spec)
    g = torch.Generator().manual_seed(0)
    views = transform(source.sample(0, g), g)
    assert set(views) == {"global_crops", "local_crops"}
    assert len(views["global_crops"]) == 2 and len(views["local_crops"]) == 3
    for crop in views["global_crops"]:
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    for crop in views["local_crops"]:
        assert crop.shape == (3, 16, 16)
    stacked = torch.cat([c.flatten() for c in views["global_crops"] + views["local_crops"]])
    assert stacked.min() >= IMAGENET_LOW - 1e-4 and stacked.max() <= IMAGENET_HIGH + 1e-4
    assert stacked.min() < 0 < stacked.max()
    assert stacked.mean().abs() < 1.5


def test_dinov2_transform_without_local_crops(flat: Path) -> None:
    cfg = small_cfg("data.crops.n_local=0")
    dom = ImagesDomain()
    g = torch.Generator().manual_seed(0)
    source, spec = dom.sample_source(str(flat), cfg)
    views = dom.ssl_transform(cfg, spec)(source.sample(0, g), g)
    assert views["local_crops"] == [] and len(views["global_crops"]) == 2


def test_mae_transform_gives_one_image(flat: Path) -> None:
    cfg = small_cfg("ssl.method=mae")
    dom = ImagesDomain()
    g = torch.Generator().manual_seed(0)
    source, spec = dom.sample_source(str(flat), cfg)
    views = dom.ssl_transform(cfg, spec)(source.sample(0, g), g)
    assert set(views) == {"image"}
    assert views["image"].shape == (3, 32, 32) and views["image"].dtype == torch.float32
    assert views["image"].min() >= IMAGENET_LOW - 1e-4 and views["image"].max() <= IMAGENET_HIGH + 1e-4


def test_eval_dataset(labelled: Path) -> None:
    cfg = small_cfg()
    ds = ImagesDomain().eval_dataset(str(labelled), cfg)
    assert list(ds.classes) == ["cats", "dogs"]
    assert len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1, 1]
    assert [Path(it["id"]).name for it in items[:2]] == ["cats_0.png", "cats_1.png"]
    for it in items:
        assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
    torch.testing.assert_close(ds[4]["image"], items[4]["image"], rtol=0, atol=0)  # deterministic


def test_embedded_sample_has_three_classes(tmp_path: Path) -> None:
    dom = ImagesDomain()
    root = dom.make_sample(tmp_path / "sample")
    assert (root / ".complete").is_file()
    folder = ImageFolder.scan(root)
    assert folder.classes == ("discs", "squares", "stripes")
    assert len(folder) == 120
    assert read_rgb(folder.files[0]).shape == (96, 96, 3)
    # a second call reuses the sample
    before = folder.files[0].stat().st_mtime_ns
    assert dom.make_sample(tmp_path / "sample") == root
    assert folder.files[0].stat().st_mtime_ns == before


def test_unknown_data_options_are_refused_by_name(flat: Path) -> None:
    from foundation.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.options.foo is not an option of the images domain"):
        load_config(None, [f"data.path={flat}", "data.options.foo=1"])  # refused when the config loads


def _photometric(cfg) -> list[str]:
    views = ImagesDomain().ssl_transform(cfg, ImagesDomain.default_spec).views
    return [type(t).__name__ for t in views.global1.transforms]


def test_color_jitter_option_scales_or_turns_off_the_jitter(flat: Path) -> None:
    from albumentations import ColorJitter

    from foundation.errors import ConfigError

    assert "ColorJitter" in _photometric(small_cfg()) and "ToGray" in _photometric(small_cfg())
    half = ImagesDomain().ssl_transform(small_cfg("data.options.color_jitter=0.5"), ImagesDomain.default_spec)
    (jitter,) = [t for t in half.views.global1.transforms if isinstance(t, ColorJitter)]
    assert jitter.brightness == pytest.approx((0.8, 1.2))  # DINOv2's 0.4, halved
    off = _photometric(small_cfg("data.options.color_jitter=0"))
    assert "ColorJitter" not in off and "ToGray" not in off and "GaussianBlur" in off
    with pytest.raises(ConfigError, match=r"data.options.color_jitter=3"):
        small_cfg("data.options.color_jitter=3")
