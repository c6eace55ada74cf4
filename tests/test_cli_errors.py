"""Every command, given bad paths, answers with one line of error and exit status 1: no traceback, nothing
created (no empty output folder), nothing of the user's changed."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from foundation.cli import main
from foundation.export import export_backbone
from foundation.models.vit import build_vit
from foundation_domains.pathology.sample import synthetic_he, write_pyramid_tiff
from foundation_domains.remote_sensing.sample import write_scene

BACKBONE_2D = dict(arch="vit_tiny", in_chans=3, spatial_dims=2, img_size=32, patch_size=8, reg_tokens=0)
BACKBONE_3D = dict(arch="vit_tiny", in_chans=1, spatial_dims=3, img_size=16, patch_size=8, reg_tokens=0)


@pytest.fixture(scope="module")
def things(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real inputs for the cases that need one good part: exports (2D RGB and 3D), a junk checkpoint, a file."""
    root = tmp_path_factory.mktemp("things")
    torch.manual_seed(0)
    export_backbone(build_vit(**BACKBONE_2D), BACKBONE_2D, root / "rgb", mean=(0.5,) * 3, std=(0.2,) * 3)
    export_backbone(build_vit(**BACKBONE_3D), BACKBONE_3D, root / "ct3d", mean=(0.0,), std=(1.0,))
    (root / "junk.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    (root / "a_file.txt").write_text("mine")
    inputs = root / "inputs"  # one real input of each kind, so only the part under test is bad
    inputs.mkdir()
    write_scene(inputs / "scene.tif", size=64)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), inputs / "ct.nii.gz")
    write_pyramid_tiff(inputs / "slide.tif", synthetic_he(512, 384), "Aperio Image Library |MPP = 0.25")
    return {
        "root": root,
        "inputs": inputs,
        "rgb": root / "rgb",
        "ct3d": root / "ct3d",
        "junk": root / "junk.pt",
    }


def _one_error_line(argv: list[str], capsys, *, code: int = 1) -> str:
    assert main([*argv, "--quiet"] if "--quiet" not in argv else argv) == code, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


MISSING_INPUTS = {
    "pretrain": lambda t, m: ["pretrain", "--data", m, "--out", str(t / "run")],
    "export": lambda t, m: ["export", m, "--out", str(t / "exp")],
    "evaluate knn": lambda t, m: ["evaluate", "knn", "--backbone", m, "--data", m, "--val-data", m],
    "evaluate linear": lambda t, m: ["evaluate", "linear", "--backbone", m, "--data", m, "--val-data", m],
    "embed": lambda t, m: ["embed", "--data", m, "--backbone", m, "--out", str(t / "f.h5")],
    "embed pathology": lambda t, m: [
        "embed",
        "--domain",
        "pathology",
        "--data",
        m,
        "--backbone",
        m,
        "--out",
        str(t / "feats"),
    ],
    "finetune canopy-height": lambda t, m: [
        "finetune",
        "canopy-height",
        "--backbone",
        m,
        "--out",
        str(t / "run"),
    ],
    "finetune organ-segmentation": lambda t, m: [
        "finetune",
        "organ-segmentation",
        "--backbone",
        m,
        "--out",
        str(t / "run"),
    ],
    "evaluate canopy-height": lambda t, m: ["evaluate", "canopy-height", "--checkpoint", m],
    "evaluate organ-segmentation": lambda t, m: ["evaluate", "organ-segmentation", "--checkpoint", m],
    "pathology-qc": lambda t, m: ["pathology-qc", m, "--out", str(t / "qc")],
    "stats": lambda t, m: ["stats", m, "--out", str(t / "s.json")],
    "canopy-height": lambda t, m: ["canopy-height", m, "--checkpoint", m, "--out", str(t / "m.tif")],
    "segment": lambda t, m: ["segment", m, "--checkpoint", m, "--out", str(t / "labels")],
    "export-bundle": lambda t, m: ["export-bundle", "--checkpoint", m, "--out", str(t / "bundle")],
}


@pytest.mark.parametrize("command", sorted(MISSING_INPUTS))
def test_a_missing_input_is_named_and_nothing_is_created(command, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    line = _one_error_line(MISSING_INPUTS[command](tmp_path, missing), capsys)
    assert "nowhere" in line
    assert _listing(tmp_path) == []


JUNK_CHECKPOINT = {
    "export": lambda t, j, i: ["export", j, "--out", str(t / "exp")],
    "embed": lambda t, j, i: ["embed", "--data", str(t), "--backbone", j, "--out", str(t / "f.h5")],
    "embed pathology": lambda t, j, i: [
        "embed",
        "--domain",
        "pathology",
        "--data",
        str(t),
        "--backbone",
        j,
        "--out",
        str(t / "feats"),
    ],
    "evaluate knn": lambda t, j, i: [
        "evaluate",
        "knn",
        "--backbone",
        j,
        "--data",
        str(t),
        "--val-data",
        str(t),
    ],
    "finetune canopy-height": lambda t, j, i: [
        "finetune",
        "canopy-height",
        "--backbone",
        j,
        "--out",
        str(t / "run"),
    ],
    "evaluate canopy-height": lambda t, j, i: ["evaluate", "canopy-height", "--checkpoint", j],
    "evaluate organ-segmentation": lambda t, j, i: ["evaluate", "organ-segmentation", "--checkpoint", j],
    "canopy-height": lambda t, j, i: [
        "canopy-height",
        str(i / "scene.tif"),
        "--checkpoint",
        j,
        "--out",
        str(t / "m.tif"),
    ],
    "segment": lambda t, j, i: [
        "segment",
        str(i / "ct.nii.gz"),
        "--checkpoint",
        j,
        "--out",
        str(t / "labels"),
    ],
    "export-bundle": lambda t, j, i: ["export-bundle", "--checkpoint", j, "--out", str(t / "bundle")],
}


@pytest.mark.parametrize("command", sorted(JUNK_CHECKPOINT))
def test_a_junk_checkpoint_is_named_and_no_output_folder_is_left(command, things, tmp_path, capsys):
    argv = JUNK_CHECKPOINT[command](tmp_path, str(things["junk"]), things["inputs"])
    line = _one_error_line(argv, capsys)
    assert "junk.pt" in line
    assert _listing(tmp_path) == []


OUT_IS_A_FILE = {
    "pretrain": lambda t, f: ["pretrain", "--out", f, "train.steps=1"],
    "export": lambda t, f: ["export", str(t["rgb"]), "--out", f],
    "embed pathology": lambda t, f: [
        "embed",
        "--domain",
        "pathology",
        "--data",
        str(t["root"]),
        "--backbone",
        str(t["rgb"]),
        "--out",
        f,
    ],
    "pathology-qc": lambda t, f: ["pathology-qc", str(t["inputs"] / "slide.tif"), "--out", f],
    "export-bundle": lambda t, f: ["export-bundle", "--checkpoint", str(t["rgb"]), "--out", f],
}


@pytest.mark.parametrize("command", sorted(OUT_IS_A_FILE))
def test_out_that_is_an_existing_file_is_refused_and_kept(command, things, capsys):
    target = things["root"] / "a_file.txt"
    _one_error_line(OUT_IS_A_FILE[command](things, str(target)), capsys)
    assert target.read_text() == "mine"


READ_ONLY_OUT = {
    "pretrain": lambda t, r: ["pretrain", "--out", str(r / "run"), "train.steps=1"],
    "finetune": lambda t, r: ["finetune", "canopy-height", "--random-init", "--out", str(r / "run")],
    "export": lambda t, r: ["export", str(t["rgb"]), "--out", str(r / "exp")],
    "embed": lambda t, r: ["embed", "--data", str(r), "--backbone", str(t["rgb"]), "--out", str(r / "f.h5")],
    "pathology-qc": lambda t, r: ["pathology-qc", str(t["inputs"] / "slide.tif"), "--out", str(r / "qc")],
}


@pytest.mark.parametrize("command", sorted(READ_ONLY_OUT))
def test_a_read_only_out_gives_one_line(command, things, read_only_dir, capsys):
    line = _one_error_line(READ_ONLY_OUT[command](things, read_only_dir), capsys)
    assert str(read_only_dir) in line


def test_a_malformed_override_names_itself(capsys):
    line = _one_error_line(["pretrain", "train.steps=[1,"], capsys)
    assert "train.steps=[1," in line and "not valid YAML" in line


def test_a_3d_backbone_given_to_pathology_embed_is_named(things, tmp_path, capsys):
    argv = [
        "embed",
        "--domain",
        "pathology",
        "--data",
        str(things["root"]),
        "--backbone",
        str(things["ct3d"]),
    ]
    line = _one_error_line([*argv, "--out", str(tmp_path / "feats")], capsys)
    assert "ct3d" in line and "3D" in line
    assert _listing(tmp_path) == []


def test_a_usage_error_exits_1(capsys):
    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--no-such-flag"])
    assert done.value.code == 1
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
