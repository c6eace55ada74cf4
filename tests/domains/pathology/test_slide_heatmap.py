"""Attention heatmaps of slide classification: tiles painted by attention percentile, on the slide when it opens."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TISSUE, write_svs
from PIL import Image

from foundation.errors import DataError, OutputError
from foundation_domains.pathology.slide_classification.heatmap import (
    BAR_WIDTH,
    check_heatmap_dir,
    percentiles,
    write_heatmap,
)


def _feature_file(path: Path, coords: np.ndarray, side: int, slide: Path | None, size=(2048, 1536)) -> Path:
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("coords", data=coords.astype(np.int64))
        dset.attrs.update({"patch_size_level0": side, "level0_width": size[0], "level0_height": size[1]})
        f.create_dataset("features", data=np.zeros((len(coords), 4), np.float32))
        f.attrs.update({"complete": True, "n_tiles": len(coords), **({"slide": str(slide)} if slide else {})})
    return path


def test_percentiles_rank_within_the_bag() -> None:
    np.testing.assert_allclose(percentiles(np.array([0.1, 0.7, 0.2])), [0.0, 1.0, 0.5])
    assert percentiles(np.array([3.0])).tolist() == [1.0]
    # ties share their mean rank (CLAM's rankdata 'average'): the mean head's equal attention is the middle of
    # the scale, not the bottom ("least attended" everywhere)
    assert percentiles(np.full(7, 1 / 7)).tolist() == [0.5] * 7
    np.testing.assert_allclose(percentiles(np.array([0.2, 0.5, 0.2, 0.1])), [0.5, 1.0, 0.5, 0.0])
    # against scipy's rankdata itself (what CLAM calls), on ties and a larger bag: the same order statistics,
    # on our 0..1 scale (CLAM's is rank / n)
    rankdata = pytest.importorskip("scipy.stats").rankdata
    scores = np.random.default_rng(0).integers(0, 20, 500) / 20
    np.testing.assert_allclose(percentiles(scores), (rankdata(scores, "average") - 1) / (len(scores) - 1))


def test_heatmap_paints_the_most_attended_tile_hot_on_the_slide(tmp_path: Path) -> None:
    slide = write_svs(tmp_path / "s.svs")  # 2048 x 1536, tissue in TISSUE
    coords = np.array([[512, 512], [768, 512], [1024, 768]])
    feats = _feature_file(tmp_path / "s.h5", coords, 256, slide)
    out = write_heatmap(tmp_path / "s.png", feats, np.array([0.1, 0.8, 0.1]), "s")
    with Image.open(out) as image:
        assert image.text["foundation"] == "slide-heatmap"
        rgb = np.asarray(image.convert("RGB")).astype(int)
    assert rgb.shape[:2] == (768, 1024 + BAR_WIDTH)  # longer side 1024: level-0 / 2; the colour bar right
    hot, cold = rgb[256 + 64, 384 + 64], rgb[256 + 64, 256 + 64]  # centres of tiles 1 and 0
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40
    # off the tiles the slide shows through: pink tissue inside the rectangle, glass outside
    inside = rgb[(TISSUE[3] - 64) // 2, (TISSUE[2] - 64) // 2]
    assert inside[0] > inside[1] + 30 and (rgb[10, 10] > 230).all()
    # without the slide (moved away) the same tiles are drawn on white
    slide.unlink()
    out = write_heatmap(tmp_path / "s.png", feats, np.array([0.1, 0.8, 0.1]), "s")
    with Image.open(out) as image:
        assert (np.asarray(image.convert("RGB"))[(TISSUE[3] - 64) // 2, (TISSUE[2] - 64) // 2] == 255).all()


def test_heatmap_folder_holds_only_ours(tmp_path: Path) -> None:
    folder = tmp_path / "heat"
    check_heatmap_dir(folder, [])  # new: fine
    folder.mkdir()
    feats = _feature_file(tmp_path / "a.h5", np.array([[0, 0]]), 256, None)
    write_heatmap(folder / "a.png", feats, np.array([1.0]), "a")
    check_heatmap_dir(folder, [])  # only ours: fine
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not heatmaps of ours \\(notes.txt\\)"):
        check_heatmap_dir(folder, [])
    with pytest.raises(OutputError, match="is \\(or holds\\) an input"):
        check_heatmap_dir(tmp_path, [tmp_path / "a.h5"])


def test_overlapping_tiles_show_the_mean_of_their_scores() -> None:
    from matplotlib import colormaps

    from foundation_domains.pathology.slide_classification.heatmap import heat_image

    # two 100-px tiles sharing 50 px on a 200 x 100 slide (drawn 1:1), scores 0 and 1
    image = heat_image(np.array([[0, 0], [50, 0]]), np.array([0.0, 1.0]), 100, (200, 100), None).astype(int)
    expected = [(np.array(colormaps["jet"](v)[:3]) * 255 * 0.5 + 127.5).astype(int) for v in (0.0, 0.5, 1.0)]
    for x, colour in zip((25, 75, 125), expected, strict=True):
        np.testing.assert_allclose(image[50, x], colour, atol=1)
    assert (image[50, 175] == 255).all()  # no tile there


def test_tile_side_of_feature_files_without_patch_size_level0(tmp_path: Path) -> None:
    from foundation_domains.pathology.slide_classification.heatmap import tile_geometry

    coords = np.array([[0, 0], [512, 0], [1024, 512], [1536, 1024]])

    def side(attrs: dict) -> int:
        with h5py.File(tmp_path / "f.h5", "w") as f:
            f.create_dataset("coords", data=coords).attrs.update(attrs)
            f.create_dataset("features", data=np.zeros((len(coords), 4), np.float32))
        return tile_geometry(tmp_path / "f.h5")[1]

    assert side({"patch_size_level0": 640, "patch_size": 320, "patch_level": 1}) == 640  # ours and TRIDENT's
    assert side({"patch_size": 512, "patch_level": 0}) == 512  # CLAM: the side at patch_level 0
    assert side({"patch_size": 128, "patch_level": 2, "downsample": (4.0, 4.0)}) == 512  # CLAM's patch files
    assert side({}) == 512  # CLAM's feature files (no attributes): the grid step, not a guessed 256
    # two tissue contours, each with its own grid origin (CLAM's per-contour grids): still the step, not 3 px
    coords = np.concatenate(
        [np.stack([np.arange(4) * 512, np.zeros(4)], 1), [[3, 4000], [515, 4000]]]
    ).astype(int)
    assert side({}) == 512
    for bad in (np.zeros((4, 3)), np.zeros((0, 2))):  # not corners, or none: named, not an IndexError
        with h5py.File(tmp_path / "bad.h5", "w") as f:
            f.create_dataset("coords", data=bad)
        with pytest.raises(DataError, match="bad.h5: cannot read its tiles .*not N x 2"):
            tile_geometry(tmp_path / "bad.h5")


def test_a_file_without_the_slide_size_is_drawn_on_the_whole_slide(tmp_path: Path) -> None:
    slide = write_svs(tmp_path / "s.svs")  # 2048 x 1536, tissue in TISSUE
    coords = np.array([[512, 512], [768, 512], [1024, 768]])  # CLAM's files: no level0_width / level0_height
    feats = _feature_file(tmp_path / "s.h5", coords, 256, slide)
    with h5py.File(feats, "r+") as f:
        for key in ("level0_width", "level0_height"):
            del f["coords"].attrs[key]
    out = write_heatmap(tmp_path / "s.png", feats, np.array([0.1, 0.8, 0.1]), "s")
    with Image.open(out) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    # the slide's own size, not the 1280 x 1024 the tiles reach: the thumbnail is not stretched under them
    assert rgb.shape[:2] == (768, 1024 + BAR_WIDTH)
    hot = rgb[256 + 64, 384 + 64]  # tile 1 where it is; glass at the far corner
    assert hot[0] > hot[2] + 40 and (rgb[700, 1000] > 230).all()
    from foundation_domains.pathology.slide_classification.heatmap import slide_thumbnail

    view = slide_thumbnail(slide)  # an SVS: QuPath shows it whole, from (0, 0)
    assert view.source == "slide" and view.size == (2048, 1536) and view.origin == (0, 0)
