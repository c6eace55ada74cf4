"""DICOM WSI: a folder of per-level ``.dcm`` instances is one slide, read through OpenSlide (libdicom)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import tissue_image, write_svs
from dicom_wsi import write_dicom_wsi

from foundation.batch import EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.config import load_config
from foundation.errors import DataError
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology import PathologyDomain
from foundation_domains.pathology.feature_names import output_names
from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.source import list_slides

BOX = (256, 256, 768, 512)  # tissue rectangle in level-0 pixels of a 1024 x 768 slide
ARGS = dict(
    arch="vit_tiny",
    in_chans=3,
    spatial_dims=2,
    img_size=64,
    patch_size=16,
    reg_tokens=0,
    init_values=None,
    qkv_bias=True,
)


def levels() -> list[np.ndarray]:
    full = tissue_image(1024, 768, box=BOX)
    return [full, cv2.resize(full, (256, 192), interpolation=cv2.INTER_AREA)]


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    """An Aperio file next to a DICOM WSI folder (two levels at 0.25 and 1.0 um/px)."""
    root = tmp_path / "slides"
    (root / "case1").mkdir(parents=True)
    write_svs(root / "case1" / "a.svs")
    write_dicom_wsi(root / "case2", levels(), mpp=0.25)
    return root


@pytest.mark.parametrize("jpeg", [False, True])
def test_dicom_levels_resolution_and_pixels(tmp_path: Path, jpeg: bool) -> None:
    images = levels()
    files = write_dicom_wsi(tmp_path / "wsi", images, mpp=0.25, jpeg=jpeg)
    for path in (tmp_path / "wsi", files[1]):  # the folder, or any one of its instances
        with open_slide(path) as slide:
            assert slide.properties["openslide.vendor"] == "dicom"
            assert slide.level_dimensions == ((1024, 768), (256, 192))
            assert slide.level_downsamples == pytest.approx((1.0, 4.0))
            assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "openslide.mpp-x"
            assert slide.best_level(1.0) == 1
            for level, image in enumerate(images):
                h, w = image.shape[:2]
                region = slide.read_region((0, 0), level, (w, h)).astype(int)
                err = np.abs(region - image)
                if jpeg:
                    assert err.mean() < 3
                else:
                    assert err.max() == 0
            # off the pixel matrix (a padded edge tile and beyond) reads as white glass
            edge = slide.read_region((1000, 700), 0, (64, 128))
            assert (edge[:, 24:] == 255).all() and (edge[68:] == 255).all()


def test_a_dicom_folder_is_one_slide_named_after_it(slides: Path, tmp_path: Path) -> None:
    found = list_slides(slides)
    assert found == (slides / "case1" / "a.svs", slides / "case2")
    assert output_names(found, slides) == ["a.h5", "case2.h5"]
    assert list_slides(slides / "case2") == (slides / "case2",)  # the folder itself given
    write_dicom_wsi(slides / "case3", levels()[1:], mpp=1.0)  # same file names as case2
    assert output_names(list_slides(slides), slides) == ["a.h5", "case2.h5", "case3.h5"]
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "IM0001.dcm").write_bytes(b"DICM" * 64)
    with pytest.raises(DataError, match=r"ct: none of its 1 \.dcm file\(s\) is a DICOM whole-slide"):
        open_slide(tmp_path / "ct")


def test_stream_gives_tissue_tiles_from_the_dicom_slide(slides: Path) -> None:
    small = ["model.patch_size=8", "model.img_size=32", "data.crops.global_size=32"]
    small += ["data.crops.local_size=16", "ssl.head_prototypes=128", "ssl.head_hidden_dim=64"]
    cfg = load_config(overrides=["domain=pathology", *small, "data.options.mpp=1.0"])
    source = PathologyDomain().sample_source(str(slides), cfg).samples
    samples = [source.sample(i, torch.Generator().manual_seed(i)) for i in range(0, 160, 8)]
    assert {Path(s["path"]).name for s in samples} == {"a.svs", "case2"}
    for s in (s for s in samples if Path(s["path"]).name == "case2"):
        assert s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8
        x, y = (int(v) for v in s["coords"])  # level-0 pixels, on the tissue rectangle
        assert BOX[0] - 128 <= x < BOX[2] and BOX[1] - 128 <= y < BOX[3]
        assert s["image"].astype(float).mean() < 215  # stained, not glass
    assert not source.broken


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_vit(**ARGS)
    out = tmp_path_factory.mktemp("backbone") / "export"
    return export_backbone(model, ARGS, out, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_embed_writes_one_hdf5_per_dicom_slide_and_skips_broken_ones(
    slides: Path, backbone: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_dicom_wsi(slides / "truncated", levels(), mpp=0.25)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # the header is whole, the pixel data cut short
    (slides / "junk").mkdir()
    (slides / "junk" / "x.dcm").write_bytes(b"\x00garbage\xff" * 500)
    out = tmp_path / "feats"
    argv = ["embed", "--domain", "pathology", "--data", str(slides), "--backbone", str(backbone)]
    argv += ["--out", str(out), "--num-workers", "0", "--quiet", "--batch-size", "16"]
    assert main([*argv, "data.options.mpp=1.0"]) == EXIT_SOME_SKIPPED
    assert "2 of 4 slides skipped" in caplog.text
    assert sorted(p.name for p in out.glob("*.h5")) == ["a.h5", "case2.h5"]
    with h5py.File(out / "case2.h5", "r") as f:
        coords, feats = f["coords"][:], f["features"][:]
        assert f.attrs["extent"] == 256  # 64 px at 1.0 um/px on a 0.25 um/px slide
    # tiles of 256 level-0 px with >= 25 % tissue on a 512 x 256 rectangle
    assert 2 <= len(coords) <= 12 and feats.shape == (len(coords), 192) and np.isfinite(feats).all()
    assert ((coords[:, 0] > BOX[0] - 256) & (coords[:, 0] < BOX[2])).all()
    assert ((coords[:, 1] > BOX[1] - 256) & (coords[:, 1] < BOX[3])).all()
    summary = json.loads((out / "summary.json").read_text())
    reasons = {Path(s["slide"]).name: s["reason"] for s in summary["skipped"]}
    assert sorted(reasons) == ["junk", "truncated"]
    assert "truncated" in reasons["truncated"] and "libdicom" in reasons["truncated"]
    assert "none of its 1 .dcm file(s)" in reasons["junk"]
