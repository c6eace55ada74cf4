"""The remote_sensing domain: options, channels and statistics from the data, windows, views, eval chips."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rs_testdata import WriteRaster, random_bands, write_raster

from foundation.config import load_config
from foundation.data.seeding import generator_for
from foundation.domain import Domain, get_domain
from foundation.errors import ConfigError, DataError
from foundation_domains.remote_sensing import RemoteSensingDomain
from foundation_domains.remote_sensing.options import RasterOptions


def small_cfg(*extra: str):
    return load_config(
        overrides=[
            "domain=remote_sensing",
            "model.arch=vit_tiny",
            "model.patch_size=8",
            "model.img_size=32",
            "data.crops.global_size=32",
            "data.crops.local_size=16",
            "data.crops.n_local=2",
            *extra,
        ]
    )


def samples(source, n: int, seed: int = 0) -> list[dict]:
    return [source.sample(i, generator_for(seed, i)) for i in range(n)]


def test_registered_and_protocol() -> None:
    domain = get_domain("remote_sensing")
    assert isinstance(domain, Domain) and isinstance(domain, RemoteSensingDomain)
    spec = domain.default_spec
    assert spec.spatial_dims == 2 and spec.channels == len(spec.mean) == len(spec.std)


def test_options_are_strict() -> None:
    with pytest.raises(ConfigError, match=re.escape("data.options.band is not an option")):
        small_cfg("data.options.band=1")  # refused when the config loads
    with pytest.raises(ConfigError, match="data.options.min_valid"):
        small_cfg("data.options.min_valid=2")
    with pytest.raises(ConfigError, match="give both or neither"):
        small_cfg("data.options.mean=[0.1]")
    with pytest.raises(ConfigError, match="data.options.stats_windows='many' must be int"):
        small_cfg("data.options.stats_windows=many")
    assert small_cfg("data.options.bands=4,3,2").data.typed_options.bands == (4, 3, 2)
    assert RasterOptions.from_options({"bands": "4,3,2"}).bands == (4, 3, 2)


def test_channels_and_statistics_come_from_the_data(raster: WriteRaster, tmp_path: Path) -> None:
    path = raster("data/a.tif", count=4, height=120, width=130, dtype="uint16")
    raster("data/b.tif", count=4, height=80, width=90, dtype="uint16", seed=1, crs="EPSG:4326", res=0.0001)
    domain = RemoteSensingDomain()
    source, spec = domain.sample_source(str(tmp_path / "data"), small_cfg())
    assert spec.channels == 4 and len(spec.mean) == len(spec.std) == 4
    assert domain.default_spec.channels == 6  # the domain itself is unchanged: the spec is a returned value
    with rasterio.open(path) as ds:
        values = ds.read().astype(np.float64) / 10000  # uint16: reflectance x 10000
    np.testing.assert_allclose(spec.mean, values.mean(axis=(1, 2)), rtol=0.05)  # both files look alike
    for s in samples(source, 8):
        assert s["image"].dtype == np.float32 and s["image"].shape == (48, 48, 4)  # 1.5 x global_size
        assert s["mask"].all() and s["image"].min() > 0 and s["image"].max() < 0.61
        assert len(s["bounds"]) == 4 and Path(s["path"]).parent == tmp_path / "data"


def test_band_selection_sets_channels(raster: WriteRaster) -> None:
    path = raster("s2.tif", count=12, height=64, width=64)
    domain = RemoteSensingDomain()
    source, spec = domain.sample_source(str(path), small_cfg("data.options.bands=4,3,2"))
    assert spec.channels == 3 and source.sample(0, generator_for(0, 0))["image"].shape[-1] == 3


def test_stream_is_deterministic(raster: WriteRaster) -> None:
    path = raster("a.tif", height=200, width=200)
    a = RemoteSensingDomain().sample_source(str(path), small_cfg()).samples
    b = RemoteSensingDomain().sample_source(str(path), small_cfg()).samples
    for x, y in zip(samples(a, 5), samples(b, 5), strict=True):
        assert x["window"] == y["window"]
        np.testing.assert_array_equal(x["image"], y["image"])
    assert len({s["window"] for s in samples(a, 10)}) > 5


def test_windows_are_never_mostly_nodata(tmp_path: Path) -> None:
    data = random_bands(3, 160, 160, "uint16")
    data[:, :, :100] = 0  # 62% of the scene is nodata
    data[:, 130:, :] = 0
    write_raster(tmp_path / "edge.tif", data, nodata=0)
    domain = RemoteSensingDomain()
    source, spec = domain.sample_source(str(tmp_path / "edge.tif"), small_cfg("data.options.min_valid=0.9"))
    drawn = samples(source, 40)
    assert all(s["mask"].mean() >= 0.9 for s in drawn)
    assert source.sparse_windows == 0
    partial = [s for s in drawn if not s["mask"].all()]
    assert partial  # some windows touch the border ...
    for s in partial:  # ... and their nodata pixels hold the band mean (zero after normalisation)
        np.testing.assert_allclose(
            s["image"][~s["mask"]], np.broadcast_to(spec.mean, (int((~s["mask"]).sum()), 3))
        )


def test_raster_smaller_than_the_crop(raster: WriteRaster) -> None:
    path = raster("tiny.tif", count=4, height=20, width=27, dtype="float32")
    cfg = small_cfg()
    domain = RemoteSensingDomain()
    source, spec = domain.sample_source(str(path), cfg)
    sample = source.sample(0, generator_for(0, 0))
    assert sample["image"].shape == (20, 27, 4)  # the whole raster
    g = generator_for(0, 1)
    views = domain.ssl_transform(cfg, spec)(sample, g)
    assert all(v.shape == (4, 32, 32) for v in views["global_crops"])
    assert all(v.shape == (4, 16, 16) for v in views["local_crops"])


@pytest.mark.parametrize("count", [1, 4, 12])
def test_views_any_band_count(raster: WriteRaster, count: int) -> None:
    path = raster("r.tif", count=count, height=64, width=64, dtype="uint16")
    domain = RemoteSensingDomain()
    cfg = small_cfg()
    source, spec = domain.sample_source(str(path), cfg)
    g = generator_for(0, 0)
    views = domain.ssl_transform(cfg, spec)(source.sample(0, g), g)
    crops = views["global_crops"] + views["local_crops"]
    assert [tuple(c.shape) for c in crops] == [(count, 32, 32)] * 2 + [(count, 16, 16)] * 2
    x = torch.cat([c.flatten() for c in crops])
    assert torch.isfinite(x).all() and x.abs().mean() < 3  # normalised with the data's own statistics
    mae = domain.ssl_transform(small_cfg("ssl.method=mae"), spec)(source.sample(1, g), g)
    assert set(mae) == {"image"} and mae["image"].shape == (count, 32, 32)


def test_colour_ops_only_on_rgb(tmp_path: Path, raster: WriteRaster) -> None:
    cfg = small_cfg()
    rgb = write_raster(tmp_path / "rgb.tif", random_bands(3, 64, 64, "uint8"), photometric="RGB")
    domain = RemoteSensingDomain()
    _, spec = domain.sample_source(str(rgb), cfg)
    assert spec.is_rgb and spec.band_names == ("red", "green", "blue")
    names = [type(t).__name__ for t in domain.ssl_transform(cfg, spec).views.global1.transforms]
    assert "ColorJitter" in names and "D4" in names
    _, spec = domain.sample_source(str(raster("nir.tif", count=3)), cfg)  # 3 bands, not red-green-blue
    assert not spec.is_rgb
    names = [type(t).__name__ for t in domain.ssl_transform(cfg, spec).views.global1.transforms]
    assert "ColorJitter" not in names and "ToGray" not in names and "D4" in names
    views = domain.ssl_transform(cfg, spec).views
    assert "Solarize" not in [type(t).__name__ for t in views.global2.transforms]


def test_statistics_file_and_explicit_values(raster: WriteRaster, tmp_path: Path) -> None:
    path = raster("a.tif", count=3)
    domain = RemoteSensingDomain()
    source, spec = domain.sample_source(str(path), small_cfg())
    stats_file = source.stats.save(tmp_path / "stats.json")
    other = RemoteSensingDomain()
    _, again = other.sample_source(str(path), small_cfg(f"data.options.stats={stats_file}"))
    assert again.mean == spec.mean and again.std == spec.std
    with pytest.raises(ConfigError, match=re.escape("was computed for bands=None")):
        other.sample_source(
            str(path), small_cfg(f"data.options.stats={stats_file}", "data.options.bands=1,2")
        )
    _, given = other.sample_source(
        str(path), small_cfg("data.options.mean=[0.1,0.2,0.3]", "data.options.std=[1,2,3]")
    )
    assert given.mean == (0.1, 0.2, 0.3) and given.std == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="2 values for 3 bands"):
        other.sample_source(str(path), small_cfg("data.options.mean=[0.1,0.2]", "data.options.std=[1,2]"))


def test_data_errors(raster: WriteRaster, tmp_path: Path) -> None:
    bad = tmp_path / "scene.tif"
    bad.write_text("GeoTIFF? no")
    with pytest.raises(DataError, match=re.escape(f"{bad}: not a readable raster")):
        RemoteSensingDomain().sample_source(str(bad), small_cfg())
    raster("mixed/a.tif", count=4)
    odd = raster("mixed/b.tif", count=6)
    with pytest.raises(DataError, match=re.escape(f"{odd}: gives 6 bands")):
        RemoteSensingDomain().sample_source(str(tmp_path / "mixed"), small_cfg())


def test_eval_dataset_of_chips(tmp_path: Path) -> None:
    root = tmp_path / "chips"
    for c, cls in enumerate(("forest", "water")):
        for i in range(3):
            data = random_bands(5, 24 + i, 30, "uint16", seed=10 * c + i)
            data[:, 0, 0] = 0
            write_raster(root / cls / f"{cls}_{i}.tif", data, nodata=0, crs=["EPSG:32633", "EPSG:32733"][c])
    domain = RemoteSensingDomain()
    ds = domain.eval_dataset(str(root), small_cfg())
    assert list(ds.classes) == ["forest", "water"] and len(ds) == 6
    items = [ds[i] for i in range(len(ds))]
    assert [it["label"] for it in items] == [0, 0, 0, 1, 1, 1]
    assert all(it["image"].shape == (5, 32, 32) and torch.isfinite(it["image"]).all() for it in items)
    torch.testing.assert_close(ds[4]["image"], items[4]["image"], rtol=0, atol=0)
    with pytest.raises(DataError, match="must be a folder of class sub-folders"):
        domain.eval_dataset(str(root / "forest" / "forest_0.tif"), small_cfg())


def test_embedded_sample_scene(tmp_path: Path) -> None:
    domain = RemoteSensingDomain()
    root = domain.make_sample(tmp_path / "sample")
    scene = root / "scene.tif"
    with rasterio.open(scene) as ds:
        assert (ds.count, ds.width, ds.height, ds.dtypes[0]) == (6, 1024, 1024, "uint16")
        assert ds.crs.to_epsg() == 32633 and ds.nodata == 0
        mask = ds.dataset_mask(out_shape=(128, 128))
    assert 0.05 < (mask == 0).mean() < 0.3  # a nodata border, as at the edge of real tiles
    before = scene.stat().st_mtime_ns
    assert domain.make_sample(tmp_path / "sample") == root and scene.stat().st_mtime_ns == before  # made once
