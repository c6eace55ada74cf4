"""Embed outputs read the way CLAM and TRIDENT read them: their names, dtypes and meanings, not our reader."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest
import torch
from conftest import HEIGHT, WIDTH, write_svs

from foundation.batch import EXIT_DONE
from foundation.cli import main
from foundation.export import export_backbone, load_backbone
from foundation.models.vit import build_vit

ARGS = dict(
    arch="vit_tiny", in_chans=3, spatial_dims=2, img_size=32, patch_size=16, reg_tokens=0, init_values=None,
    qkv_bias=True,
)  # fmt: skip
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("backbone") / "export"
    return export_backbone(build_vit(**ARGS), ARGS, out, mean=MEAN, std=STD)


def _embed(slides: Path, backbone: Path, out: Path, mpp: float, *extra: str) -> int:
    argv = ["embed", "--domain", "pathology", "--data", str(slides), "--backbone", str(backbone)]
    argv += ["--out", str(out), "--num-workers", "0", "--quiet", *extra, f"data.options.mpp={mpp}"]
    return main(argv)


def test_clam_and_trident_read_our_files(backbone: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    svs = write_svs(slides / "s1.svs", mpp=0.25)  # levels at 0.25, 0.5, 1.0 um/px
    feats = tmp_path / "feats"
    # 32 px tiles at 0.75 um/px: read on level 1 (0.5 um/px) as 48 px and shrunk; 96 level-0 px
    assert _embed(slides, backbone, feats, 0.75, "--bags", "pt") == EXIT_DONE

    # CLAM's Generic_MIL_Dataset: torch.load(DATA/pt_files/<slide_id>.pt), or features/coords of the h5
    bag = torch.load(feats / "pt_files" / "s1.pt")
    with h5py.File(feats / "s1.h5", "r") as f:
        features, coords = f["features"][:], f["coords"][:]
        patch_level = f["coords"].attrs["patch_level"]  # CLAM's Whole_Slide_Bag_FP
        patch_size = f["coords"].attrs["patch_size"]
        attrs = dict(f["coords"].attrs)  # TRIDENT's read_coords
    assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32 and bag.shape == features.shape
    assert torch.equal(bag, torch.from_numpy(features))
    assert features.dtype == np.float32 and coords.dtype == np.int64 and coords.shape == (len(features), 2)

    # CLAM: read_region(coord, patch_level, (patch_size, patch_size)) is the tile; resized to the model's input
    # and normalised, the backbone gives the stored features
    assert (int(patch_level), int(patch_size)) == (1, 48)
    wsi = openslide.OpenSlide(str(svs))
    assert patch_size * wsi.level_downsamples[patch_level] == 96  # CLAM's stitching: level-0 side
    model, _ = load_backbone(str(backbone))
    picks = [0, len(coords) // 2, len(coords) - 1]
    tiles = []
    for i in picks:
        region = np.asarray(wsi.read_region(tuple(int(v) for v in coords[i]), int(patch_level), (48, 48)))
        tiles.append(cv2.resize(region[..., :3], (32, 32), interpolation=cv2.INTER_AREA))
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        again = model.eval().forward_dict(x)["cls"].numpy()
    np.testing.assert_allclose(again, features[picks], atol=1e-4)

    # TRIDENT: coords are level 0; patch_size_level0 is the level-0 side (its slide encoders, heatmaps);
    # magnifications are 10 / mpp; patch_size_level0 = side at target x level0_mag / target_mag
    assert int(attrs["patch_size_level0"]) == 96
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    assert attrs["target_magnification"] == pytest.approx(10 / 0.75)
    side_at_target = attrs["tile_size"]
    ratio = attrs["level0_magnification"] / attrs["target_magnification"]
    assert round(side_at_target * ratio) == attrs["patch_size_level0"]
    assert (attrs["level0_width"], attrs["level0_height"]) == (WIDTH, HEIGHT)
    assert attrs["overlap"] == 0 and attrs["name"] == "s1"
    assert (
        (coords % 96 == 0).all()
        and (coords[:, 0] + 96 <= WIDTH).all()
        and (coords[:, 1] + 96 <= HEIGHT).all()
    )
    # ours beside them: resolution, backbone identity, normalisation
    assert attrs["mpp"] == pytest.approx(0.75) and attrs["slide_mpp"] == pytest.approx(0.25)
    assert len(attrs["backbone_fingerprint"]) > 8 and attrs["pooling"] == "cls"
    np.testing.assert_allclose(attrs["mean"], MEAN)
    np.testing.assert_allclose(attrs["std"], STD)


def test_bag_of_a_complete_slide_is_written_from_its_file(backbone: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_svs(slides / "s1.svs", mpp=0.25)
    feats = tmp_path / "feats"
    assert _embed(slides, backbone, feats, 1.0) == EXIT_DONE
    assert not (feats / "pt_files").exists()
    stamp = (feats / "s1.h5").stat().st_mtime_ns
    # the rerun with --bags finds the slide complete: its bag comes from the file, the file is untouched
    assert _embed(slides, backbone, feats, 1.0, "--bags", "pt") == EXIT_DONE
    assert (feats / "s1.h5").stat().st_mtime_ns == stamp
    with h5py.File(feats / "s1.h5", "r") as f:
        assert f["coords"].attrs["patch_level"] == 2 and f["coords"].attrs["patch_size"] == 32  # read as is
        assert torch.equal(torch.load(feats / "pt_files" / "s1.pt"), torch.from_numpy(f["features"][:]))
    # a damaged bag is rewritten from the file
    (feats / "pt_files" / "s1.pt").write_bytes(b"not a tensor")
    assert _embed(slides, backbone, feats, 1.0, "--bags", "pt") == EXIT_DONE
    assert torch.load(feats / "pt_files" / "s1.pt").shape[1] == 192
