"""Slide reading: both readers, MPP from every source of the fallback chain, compositing, refusals, handle cache."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import HEIGHT, TISSUE, WIDTH, pyramid, tissue_image, write_generic, write_levels, write_svs

from foundation.errors import DataError
from foundation_domains.pathology.slide import Slide, SlideCache, find_mpp, open_slide

PINK = np.array((225, 140, 185))


def test_aperio_svs_read_by_openslide(svs: Path) -> None:
    with open_slide(svs) as slide:
        assert slide.backend == "openslide" and slide.properties["openslide.vendor"] == "aperio"
        assert slide.level_dimensions == (
            (WIDTH, HEIGHT),
            (WIDTH // 2, HEIGHT // 2),
            (WIDTH // 4, HEIGHT // 4),
        )
        assert slide.level_downsamples == pytest.approx((1, 2, 4))
        assert slide.mpp == pytest.approx(0.25) and slide.level_mpp(2) == pytest.approx(1.0)
        region = slide.read_region((600, 600), 0, (50, 40))
        assert region.shape == (40, 50, 3) and region.dtype == np.uint8
        assert np.abs(np.median(region.reshape(-1, 3), axis=0) - PINK).max() < 12  # JPEG tolerance
        assert (slide.read_region((0, 0), 1, (32, 32)) > 235).all()  # glass


def test_generic_pyramid_mpp_from_resolution_tags(generic_tiff: Path, tmp_path: Path) -> None:
    with open_slide(generic_tiff) as slide:
        assert slide.backend == "openslide" and slide.level_count == 3
        assert slide.mpp == pytest.approx(0.5)
        region = slide.read_region((TISSUE[0] - 32, TISSUE[1]), 2, (16, 16))  # lossless: exact
        np.testing.assert_array_equal(region, pyramid(tissue_image())[2][128:144, 120:136])
    with open_slide(write_generic(tmp_path / "inch.tif", mpp=0.25, unit="INCH")) as slide:
        assert slide.mpp == pytest.approx(0.25)


def test_ome_subifd_pyramid_through_tifffile(ome_tiff: Path) -> None:
    with open_slide(ome_tiff) as slide:
        assert slide.backend == "tifffile"  # OpenSlide would see one level and no resolution
        assert slide.level_count == 3 and slide.level_downsamples == pytest.approx((1, 2, 4))
        assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "OME PhysicalSizeX"
        expected = tissue_image()[700:740, 600:664]
        np.testing.assert_array_equal(slide.read_region((600, 700), 0, (64, 40)), expected)
        # a level-1 read spans several 256 px tiles and matches the level written
        lvl1 = slide.read_region((400, 400), 1, (300, 300))
        assert lvl1.shape == (300, 300, 3)
        assert (lvl1[:40, :40] > 240).all() and np.abs(lvl1[100:, 100:].mean((0, 1)) - PINK).max() < 20


def test_single_level_stripped_tiff(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    image = tissue_image(1024, 768, box=(256, 256, 768, 512))
    tifffile.imwrite(path, image, rowsperstrip=64, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.level_count == 1 and slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region((250, 100), 0, (100, 200)), image[100:300, 250:350])


def test_outside_and_transparent_pixels_are_white(tmp_path: Path) -> None:
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:256, :, 3] = 255  # scanned
    rgba[256:, :256, 3] = 128  # half transparent
    res = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER", "extrasamples": ["unassalpha"]}
    tiled = write_levels(tmp_path / "rgba.tif", [rgba], first=res)
    stripped = tmp_path / "rgba_strips.tif"
    tifffile.imwrite(stripped, rgba, rowsperstrip=32, **res)
    for path, backend in ((tiled, "openslide"), (stripped, "tifffile")):
        with open_slide(path) as slide:
            assert slide.backend == backend
            out = slide.read_region((0, 0), 0, (512, 512))
            assert tuple(out[10, 10]) == (10, 20, 30)
            assert (out[300:, 300:] == 255).all(), backend  # fully transparent -> white, not black
            half = out[300, 100].astype(int)
            assert all(100 < v < 160 for v in half), (backend, half)  # straight alpha blended onto white
            beyond = slide.read_region((480, 100), 0, (64, 16))  # past the right edge
            assert (beyond[:, 32:] == 255).all() and tuple(beyond[0, 0]) == (10, 20, 30)


def test_mpp_fallback_chain_order() -> None:
    assert find_mpp({"openslide.mpp-x": "0.25", "tiff.ImageDescription": "Aperio|MPP = 0.5"}) == (
        0.25,
        "openslide.mpp-x",
    )
    assert find_mpp({"tiff.ImageDescription": "Aperio x|AppMag = 20|MPP = 0.499"})[0] == pytest.approx(0.499)
    assert find_mpp({"ome.PhysicalSizeX": "250", "ome.PhysicalSizeXUnit": "nm"})[0] == pytest.approx(0.25)
    cm = {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}
    assert find_mpp(cm)[0] == pytest.approx(0.25)
    # 72 dpi and unit-less resolutions are screen defaults, not microscope resolutions
    assert find_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})[0] is None
    assert find_mpp({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"})[0] is None
    mpp, source = find_mpp({"openslide.objective-power": "20"})
    assert mpp == pytest.approx(0.5) and "objective power" in source


def test_objective_power_is_a_loud_last_resort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_svs(tmp_path / "nompp.svs", mpp=None, appmag=20)
    with (
        caplog.at_level(logging.WARNING, logger="foundation_domains.pathology.slide"),
        open_slide(path) as slide,
    ):
        assert slide.mpp == pytest.approx(0.5)
    assert "nompp.svs" in caplog.text and "objective power" in caplog.text


def test_slide_without_resolution_is_refused_with_how_to(tmp_path: Path) -> None:
    path = write_levels(tmp_path / "nores.tif", [tissue_image(512, 512, box=(0, 0, 256, 256))])
    with pytest.raises(DataError, match=re.escape(str(path))) as info:
        open_slide(path)
    message = str(info.value)
    assert "no usable resolution" in message and "data.options.slide_mpp=" in message
    assert "mpp_csv" in message and "--slide-mpp" in message
    with open_slide(path, mpp=0.5) as slide:  # the override makes it usable
        assert slide.mpp == 0.5 and slide.mpp_source == "override"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("junk.svs", b"\x00not a slide\xff" * 200),
        ("empty.tif", b""),
        ("truncated.tif", b"II*\x00\x08\x00\x00\x00"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(path))):
        open_slide(path)
    with pytest.raises(DataError, match="does not exist"):
        Slide(tmp_path / "missing.svs")


def test_thumbnail_and_resampled_read(svs: Path) -> None:
    with open_slide(svs) as slide:
        thumb = slide.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and thumb.shape[:2] == (192, 256)
        tissue = thumb[70:120, 70:180]  # the rectangle spans (64..192, 64..128) at 8 px per thumbnail px
        assert np.abs(tissue.reshape(-1, 3).mean(0) - PINK).max() < 40
        small = slide.read_at_mpp(2.0, chunk=100)  # chunked reads stitch without seams
        assert small.shape == (HEIGHT // 8, WIDTH // 8, 3)
        np.testing.assert_allclose(small[:, :50].mean(), 245, atol=3)


def test_slide_cache_bounds_open_handles(tmp_path: Path) -> None:
    paths = [
        write_svs(tmp_path / f"s{i}.svs", image=tissue_image(512, 512, box=(0, 0, 256, 256)))
        for i in range(3)
    ]
    cache = SlideCache(max_open=2)
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first  # reused
    cache.get(paths[1])
    cache.get(paths[2])  # evicts paths[0], the least recently used
    assert len(cache._slides) == 2 and first._reader is None
    cache.discard(paths[2])
    assert len(cache._slides) == 1
