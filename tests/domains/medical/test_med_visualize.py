"""``foundation visualize --domain medical``: axial/coronal/sagittal planes for 2D and 3D backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from med_testdata import write_nifti

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.medical.visualize import PLANES, centre_cube, middle_slice


def _export(folder: Path, spatial_dims: int) -> Path:
    torch.manual_seed(0)
    args = dict(
        arch="vit_tiny", in_chans=1, spatial_dims=spatial_dims, img_size=16, patch_size=8, reg_tokens=1
    )
    return export_backbone(build_vit(**args), args, folder, mean=(0.0,), std=(1.0,))


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A 24 x 20 x 12 CT (1.5 x 1.5 x 2 mm, RAS) with a bright block in the patient's right-anterior-superior."""
    data = np.full((24, 20, 12), -1000.0, np.float32)
    data[16:22, 12:18, 8:11] = 300.0
    return write_nifti(tmp_path / "case.nii.gz", data, np.diag([1.5, 1.5, 2.0, 1.0]))


def test_radiological_planes() -> None:
    """RAS axes: a voxel at the largest X (right), Y (anterior) or Z (superior) lands top-left where it should."""
    shape = (1, 4, 5, 6)  # middle slices: X 2, Y 2, Z 3
    axial, coronal, sagittal = (torch.zeros(shape) for _ in range(3))
    axial[0, 3, 4, 3] = 1  # right, anterior
    coronal[0, 3, 2, 5] = 1  # right, superior
    sagittal[0, 2, 4, 5] = 1  # anterior, superior
    for array, view, size in (
        (axial, PLANES[0], (5, 4)),
        (coronal, PLANES[1], (6, 4)),
        (sagittal, PLANES[2], (6, 5)),
    ):
        plane = middle_slice(array, view)
        assert plane.shape == (1, *size) and plane[0, 0, 0] == 1 and plane.sum() == 1, view.label
    cube = centre_cube(torch.ones(1, 10, 3, 4), 6)
    assert cube.shape == (1, 6, 6, 6) and cube.sum() == 6 * 3 * 4 and cube[0, :, 0].sum() == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_planes_of_a_volume(dims: int, volume: Path, tmp_path: Path, single_thread: None, capsys) -> None:
    backbone = _export(tmp_path / f"bb{dims}", dims)
    out = tmp_path / "vis"
    args = ["visualize", "--quiet", "--domain", "medical", "--backbone", str(backbone), str(volume)]
    assert main([*args, "--out", str(out)]) == 0
    pictures = json.loads(capsys.readouterr().out)["pictures"]
    if dims == 2:
        assert [p["png"] for p in pictures] == ["case_axial.png", "case_coronal.png", "case_sagittal.png"]
    else:
        assert [(p["png"], p["grid"]) for p in pictures] == [("case.png", [2, 2, 2])]
    assert all((out / p["png"]).is_file() for p in pictures)
    if dims == 2:  # reading options are the domain's data.options, checked by its own rules
        assert main([*args, "--out", str(tmp_path / "v2"), "--option", "modality=pet"]) == 1
        assert "data.options.modality='pet' is not one of" in capsys.readouterr().err
