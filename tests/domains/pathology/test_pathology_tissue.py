"""Tissue detection and tiling on a known layout, level choice at a target resolution, the QC picture."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import HEIGHT, TISSUE, WIDTH, tissue_image

from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.stain import HEDJitter, HEDJitterOnDevice, hed_to_rgb, rgb_to_hed
from foundation_domains.pathology.tissue import detect_tissue, mask_for_tiles, plan_tiles, read_tile, write_qc


def _inside(x: int, y: int, extent: int) -> bool:
    x0, y0, x1, y1 = TISSUE
    return x0 <= x and x + extent <= x1 and y0 <= y and y + extent <= y1


def _overlaps(x: int, y: int, extent: int) -> bool:
    x0, y0, x1, y1 = TISSUE
    return x < x1 and x + extent > x0 and y < y1 and y + extent > y0


def test_detect_tissue_on_known_layout() -> None:
    small = cv2.resize(tissue_image(), (WIDTH // 16, HEIGHT // 16), interpolation=cv2.INTER_AREA)
    mask = detect_tissue(small)
    x0, y0, x1, y1 = (v // 16 for v in TISSUE)
    assert mask[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].all()
    outside = np.ones_like(mask)
    outside[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2] = False
    assert not mask[outside].any()
    assert not detect_tissue(np.full((64, 64, 3), 240, np.uint8)).any()  # blank glass: nothing


def test_tiles_on_tissue_only_in_level0_pixels_on_a_lower_level(svs: Path) -> None:
    with open_slide(svs) as slide:  # 0.25 um/px, levels at 1x 2x 4x
        tiling = plan_tiles(slide, mask_for_tiles(slide, 1.0, 64), mpp=1.0, tile_size=64, min_tissue=0.25)
        # 64 px at 1 um/px: level 2 (1 um/px) read as is, 256 level-0 pixels (0.25 um/px) per side
        assert (tiling.level, tiling.read_size, tiling.extent) == (2, 64, 256)
        coords = {(int(x), int(y)) for x, y in tiling.coords}
        assert (tiling.coords % 256 == 0).all()
        full_grid = {(x, y) for x in range(0, WIDTH, 256) for y in range(0, HEIGHT, 256)}
        assert {c for c in full_grid if _inside(*c, 256)} <= coords  # every tile inside the tissue
        assert all(_overlaps(x, y, 256) for x, y in coords)  # no tile on glass alone
        assert (tiling.tissue >= 0.25).all() and tiling.tissue.max() == pytest.approx(1.0)
        # the tile read on level 2 is the same place as level 0 downsampled
        i = next(i for i, (x, y) in enumerate(tiling.coords) if _inside(int(x), int(y), 256))
        x, y = (int(v) for v in tiling.coords[i])
        tile = read_tile(slide, tiling, i)
        ref = cv2.resize(slide.read_region((x, y), 0, (256, 256)), (64, 64), interpolation=cv2.INTER_AREA)
        assert tile.shape == (64, 64, 3) and np.abs(tile.astype(int) - ref).mean() < 6


def test_level_choice_and_resize_at_other_targets(svs: Path) -> None:
    with open_slide(svs) as slide:
        mask = mask_for_tiles(slide, 0.5, 32)
        half = plan_tiles(slide, mask, mpp=0.5, tile_size=32)
        assert (half.level, half.read_size, half.extent) == (1, 32, 64)
        between = plan_tiles(slide, mask, mpp=0.7, tile_size=32)  # no level at 0.7: finer level, resized
        assert between.level == 1 and between.read_size == round(32 * 0.7 / 0.5) and between.extent == 90
        assert read_tile(slide, between, 0).shape == (32, 32, 3)
        finer = plan_tiles(slide, mask, mpp=0.125, tile_size=32)  # finer than the scan: level 0, upsampled
        assert finer.level == 0 and finer.read_size == 16
        assert read_tile(slide, finer, 0).shape == (32, 32, 3)


def test_qc_picture(svs: Path, tmp_path: Path) -> None:
    with open_slide(svs) as slide:
        mask = mask_for_tiles(slide, 1.0, 64)
        tiling = plan_tiles(slide, mask, 1.0, 64)
        png = write_qc(tmp_path / "qc" / "aperio.svs.png", slide, mask, tiling, max_size=512)
    image = cv2.imread(str(png))
    assert image.shape[1] == 512 and image.shape[0] > 384  # thumbnail plus a caption bar
    assert not list(png.parent.glob(".*"))  # no temporary left behind
    # the outline is drawn in green and the tiles shaded blue over the tissue, not over the glass
    b, g, r = (image[22:, :, c].astype(int) for c in range(3))
    green = (g > 150) & (r < 60) & (b < 60)
    assert green.any()
    ys, xs = np.nonzero(green)
    x0, y0, x1, y1 = (v // 4 for v in TISSUE)  # 4 level-0 px per picture px
    assert x0 - 8 <= xs.min() and xs.max() <= x1 + 8 and y0 - 8 <= ys.min() and ys.max() <= y1 + 8
    assert (image[22 + 10, 10] > 235).all()  # glass corner untouched


def test_hed_round_trip_and_jitter() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(hed_to_rgb(rgb_to_hed(rgb)), rgb)
    white = np.full((4, 4, 3), 255, np.uint8)
    np.testing.assert_array_equal(hed_to_rgb(rgb_to_hed(white)), white)
    haematoxylin = rgb_to_hed(np.array([[[90, 60, 150]]], np.uint8))[0, 0]
    eosin = rgb_to_hed(np.array([[[235, 140, 185]]], np.uint8))[0, 0]
    assert haematoxylin[0] > haematoxylin[1] and eosin[1] > eosin[0]  # each stain where it belongs
    tile = tissue_image(64, 64, box=(0, 0, 64, 64))
    t = HEDJitter(scale=0.0, shift=0.0)
    np.testing.assert_array_equal(t(image=tile)["image"], tile)
    t = HEDJitter(scale=0.3, shift=0.1)
    t.set_random_seed(1)
    a = t(image=tile)["image"]
    t.set_random_seed(1)
    np.testing.assert_array_equal(t(image=tile)["image"], a)  # reproducible from the seed
    assert a.dtype == np.uint8 and a.shape == tile.shape and np.abs(a.astype(int) - tile).mean() > 1
    with pytest.raises(ValueError, match="scale"):
        HEDJitter(scale=1.5)


def test_hed_jitter_on_device_matches_the_worker_version() -> None:
    """The batched torch op gives the pixels of the numpy/OpenCV one for the same draw (up to its rounding)."""
    tiles = np.stack([tissue_image(32, 32, box=(0, 0, 32, 32), seed=s) for s in range(3)])
    op = HEDJitterOnDevice(scale=0.3, shift=0.1)
    params = torch.tensor([op.draw(np.random.default_rng(s).random(6)) for s in range(3)])
    assert (
        params.shape == (3, 6) and (params[:, :3] - 1).abs().max() <= 0.3 and params[:, 3:].abs().max() <= 0.1
    )
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    out = op.apply(x, params)
    for i in range(3):
        alpha, beta = params[i, :3].numpy(), params[i, 3:].numpy()
        expected = hed_to_rgb(rgb_to_hed(tiles[i]) * alpha + beta)
        got = out[i].permute(1, 2, 0).numpy() * 255
        assert np.abs(got - expected).max() <= 0.51  # the worker version rounds to uint8
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 3)
    torch.testing.assert_close(op.apply(x, identity), x, atol=1e-5, rtol=0)
    assert op.draw(np.zeros(6)) == pytest.approx([0.7, 0.7, 0.7, -0.1, -0.1, -0.1])
    with pytest.raises(ValueError, match="shift"):
        HEDJitterOnDevice(shift=-1)
