"""``foundation visualize --domain pathology``: a slide region at an mpp, tissue tiles, a feature file's tiles."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TISSUE, write_svs

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology.slide import open_slide
from foundation_domains.pathology.visualize import read_region_at


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", in_chans=3, img_size=32, patch_size=8, reg_tokens=0)
    out = tmp_path_factory.mktemp("bb") / "export"
    return export_backbone(build_vit(**args), args, out, mean=(0.5,) * 3, std=(0.25,) * 3)


def _run(backbone: Path, out: Path, *args: str) -> int:
    return main(
        [
            "visualize",
            "--quiet",
            "--domain",
            "pathology",
            "--backbone",
            str(backbone),
            "--out",
            str(out),
            *args,
        ]
    )


def test_region_is_read_at_the_chosen_mpp(svs: Path) -> None:
    with open_slide(svs) as slide:  # 0.25 um/px; at 2 um/px one output pixel is 8 level-0 pixels
        region = read_region_at(slide, (400, 400, 1280, 768), 2.0)
    assert region.shape == (96, 160, 3)
    x0 = (TISSUE[0] - 400) // 8  # the tissue's left edge, in output pixels
    assert (
        region[60, x0 + 6].mean() < 215 and region[60, x0 - 6].min() > 235
    )  # tissue right of it, glass left


def test_slide_region_picture(svs: Path, backbone: Path, tmp_path: Path, single_thread: None, capsys) -> None:
    out = tmp_path / "vis"
    assert _run(backbone, out, "--slide", str(svs), "--region", "400,400,1280,768", "--mpp", "2") == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p["grid"] for p in summary["pictures"]] == [[12, 20]]
    assert (out / summary["pictures"][0]["png"]).is_file()


def test_tissue_tiles_and_feature_file_tiles(
    svs: Path, backbone: Path, tmp_path: Path, single_thread: None, capsys
) -> None:
    out = tmp_path / "tiles"
    assert _run(backbone, out, str(svs), "--mpp", "2", "--max-tiles", "3") == 0
    titles = [p["input"] for p in json.loads(capsys.readouterr().out)["pictures"]]
    assert len(titles) == 3 and all("tile" in t for t in titles)
    h5 = tmp_path / "aperio.h5"  # the attributes `foundation embed --domain pathology` stores with coords
    with h5py.File(h5, "w") as f:
        f.create_dataset("coords", data=np.array([[512, 512], [768, 512], [1024, 768]], np.int64))
        f.create_dataset("features", data=np.zeros((3, 4), np.float32))
        f.attrs.update(
            slide=str(svs.resolve()), mpp=1.0, tile_size=32, level=1, read_size=64, extent=128,
            mpp_source="file", slide_mpp=0.25, complete=True, n_tiles=3,
        )  # fmt: skip
    out = tmp_path / "h5"
    assert _run(backbone, out, str(h5), "--max-tiles", "2") == 0
    pictures = json.loads(capsys.readouterr().out)["pictures"]
    assert [p["png"] for p in pictures] == ["aperio_tile0.png", "aperio_tile2.png"]
    assert all(p["grid"] == [4, 4] for p in pictures)


def test_region_outside_the_slide(svs: Path, backbone: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vis"
    assert _run(backbone, out, "--slide", str(svs), "--region", "2000,0,512,512") == 1
    err = capsys.readouterr().err
    assert str(svs) in err and "outside the slide" in err
    assert not out.exists()


def test_slide_without_resolution_takes_slide_mpp(backbone: Path, tmp_path: Path, capsys) -> None:
    slide = write_svs(tmp_path / "nompp.svs", mpp=None, appmag=0)
    args = ["--slide", str(slide), "--region", "512,512,256,256", "--mpp", "2"]
    assert _run(backbone, tmp_path / "v1", *args) == 1
    assert str(slide) in capsys.readouterr().err and not (tmp_path / "v1").exists()
    assert _run(backbone, tmp_path / "v2", *args, "--option", "slide_mpp=0.25") == 0
    assert json.loads(capsys.readouterr().out)["pictures"][0]["grid"] == [4, 4]  # 256 px x 0.25 / 2 = 32 px
