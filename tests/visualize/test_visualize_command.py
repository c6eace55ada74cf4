"""``foundation visualize`` on image folders: one marked PNG per input, and refusals that leave nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation.outputs import MARKER


def tiny_export(folder: Path, in_chans: int = 3, spatial_dims: int = 2, reg_tokens: int = 2) -> Path:
    """A random ViT-tiny/8 on 32 px written as an export folder (what `foundation export` writes)."""
    torch.manual_seed(0)
    args = dict(
        arch="vit_tiny", in_chans=in_chans, spatial_dims=spatial_dims, img_size=32, patch_size=8,
        reg_tokens=reg_tokens,
    )  # fmt: skip
    mean = (0.5,) * in_chans
    return export_backbone(build_vit(**args), args, folder, mean=mean, std=(0.25,) * in_chans)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("bb") / "export")


def test_one_png_per_image(
    backbone: Path, image_folder: Path, tmp_path: Path, single_thread: None, capsys
) -> None:
    images = sorted((image_folder / "discs").glob("*.png"))[:2]
    out = tmp_path / "vis"
    assert (
        main(["visualize", "--quiet", "--backbone", str(backbone), *map(str, images), "--out", str(out)]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"{p.stem}.png" for p in images)
    assert summary["normalisation"] == "backbone" and len(summary["pictures"]) == 2
    assert (out / MARKER).is_file() and (out / "summary.json").is_file()
    with Image.open(out / pngs[0]) as im:
        assert im.text.get("Software") == "foundation"
        assert im.width > 400 and im.height > 300
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn, not blank
    assert not list(tmp_path.glob(".tmp-*"))


def test_existing_output_needs_overwrite(
    backbone: Path, image_folder: Path, tmp_path: Path, single_thread: None, capsys
) -> None:
    image = str(sorted((image_folder / "discs").glob("*.png"))[0])
    out = tmp_path / "vis"
    args = ["visualize", "--quiet", "--backbone", str(backbone), image, "--out", str(out)]
    assert main(args) == 0
    before = (out / "summary.json").stat().st_mtime_ns
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "summary.json").stat().st_mtime_ns == before
    assert main([*args, "--overwrite"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main([*args[:-1], str(foreign), "--overwrite"]) == 1
    assert (foreign / "notes.txt").read_text() == "keep" and len(list(foreign.iterdir())) == 1


def test_input_smaller_than_a_patch(backbone: Path, tmp_path: Path, capsys) -> None:
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tiny)
    out = tmp_path / "vis"
    assert main(["visualize", "--quiet", "--backbone", str(backbone), str(tiny), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(tiny) in err and "smaller than one 8-pixel patch" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_channels_that_do_not_fit(image_folder: Path, tmp_path: Path, capsys) -> None:
    grey = tiny_export(tmp_path / "grey", in_chans=1)
    image = sorted((image_folder / "discs").glob("*.png"))[0]
    out = tmp_path / "vis"
    assert main(["visualize", "--quiet", "--backbone", str(grey), str(image), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(image) in err and "has 3 channels, the backbone takes 1" in err
    assert not out.exists()


def test_options_another_domain_uses_are_refused(backbone: Path, image_folder: Path, tmp_path: Path, capsys):
    args = [
        "visualize",
        "--quiet",
        "--backbone",
        str(backbone),
        str(image_folder),
        "--out",
        str(tmp_path / "v"),
    ]
    assert main([*args, "--bands", "1,2,3"]) == 1
    assert "--bands: not used by the 'images' domain" in capsys.readouterr().err
    assert main([*args, "--option", "modality=mr"]) == 1
    assert (
        "--option modality: not an option of the 'images' domain's visualize inputs"
        in capsys.readouterr().err
    )
    assert main([*args, "--option", "modality"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
