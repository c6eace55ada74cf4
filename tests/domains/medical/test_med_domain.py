"""The medical domain: registry, embedded phantoms, MAE views, refusals, and pretraining end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import oblique_affine, write_dicom_series, write_nifti

from foundation.cli import main
from foundation.config import RECIPES, load_config
from foundation.domain import get_domain
from foundation.errors import ConfigError, DataError
from foundation.train.checkpoint import latest_checkpoint, load_checkpoint
from foundation_domains.medical.domain import MedicalDomain, NotAvailableYetError
from foundation_domains.medical.phantom import LABELS, make_sample_volumes
from foundation_domains.medical.volume import find_volumes

RECIPE = RECIPES / "medical" / "tiny.yaml"
QUICK = ["train.steps=2", "train.batch_size=2", "train.checkpoint_every=2", "data.num_workers=0"]


def test_registered_through_the_entry_point() -> None:
    domain = get_domain("medical")
    assert isinstance(domain, MedicalDomain) and domain.default_spec.spatial_dims == 3


def test_embedded_phantoms(tmp_path: Path) -> None:
    root = make_sample_volumes(tmp_path / "sample", count=2)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["modality"] == {"0": "CT"}
    images = find_volumes(root)
    assert [p.name for p in images] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert all(p.parent.name == "imagesTr" for p in images)  # labels are not pretrained on
    img, lab = nib.load(images[0]), nib.load(root / "labelsTr" / images[0].name)
    assert np.allclose(img.affine, lab.affine) and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    hu, labels = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    assert set(np.unique(labels)) == set(LABELS.values())
    for organ, low, high in (("liver", 40, 80), ("kidney_left", 10, 50), ("spleen", 25, 65)):
        assert low < hu[labels == LABELS[organ]].mean() < high
    assert hu[labels == LABELS["vertebra"]].mean() > 500 and hu.min() < -900
    assert make_sample_volumes(tmp_path / "sample", count=2) == root  # written once


def test_mae_view_flips_and_normalises_deterministically() -> None:
    domain = MedicalDomain()
    view = domain.ssl_transform(load_config(RECIPE), domain.default_spec)
    sample = {"image": torch.rand(1, 16, 16, 16)}
    a = view(sample, torch.Generator().manual_seed(1))["image"]
    b = view(sample, torch.Generator().manual_seed(1))["image"]
    assert a.shape == (1, 16, 16, 16) and a.dtype == torch.float32 and torch.equal(a, b)


def test_dinov2_on_3d_and_3d_eval_are_refused_clearly() -> None:
    domain = MedicalDomain()
    with pytest.raises(ConfigError, match="runs DINOv2 on 2D slices"):
        domain.ssl_transform(
            load_config(RECIPE, ["ssl.method=dinov2", "model.spatial_dims=3"]), domain.default_spec
        )
    with pytest.raises(NotAvailableYetError, match="probes of 3D medical backbones are not available"):
        domain.eval_dataset("anything", load_config(RECIPE))  # the 3D MAE recipe


def test_mixed_channel_counts_are_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", np.zeros((8, 8, 8), np.float32), oblique_affine())
    write_nifti(tmp_path / "b.nii.gz", np.zeros((8, 8, 8, 2), np.float32), oblique_affine())
    cfg = load_config(RECIPE, ["data.options.modality=mr"])
    with pytest.raises(DataError, match="different channel counts"):
        MedicalDomain().sample_source(str(tmp_path), cfg)


def run_pretrain(capsys, out: Path, *argv: str) -> dict:
    assert main(["pretrain", "--domain", "medical", "--quiet", "--out", str(out), *argv, *QUICK]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    state = load_checkpoint(latest_checkpoint(out))
    assert state["step"] == 2 and state["domain"] == "medical"
    assert state["backbone_args"]["spatial_dims"] == 3
    assert (out / "export" / "config.json").is_file()
    return state


def test_pretrain_on_nifti_and_dicom(tmp_path: Path, capsys, single_thread) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_nifti(data / "small.nii.gz", rng.normal(0, 100, (30, 40, 20)).astype(np.float32), oblique_affine())
    stored = rng.integers(800, 1300, (24, 20, 8)).astype(np.uint16)
    write_dicom_series(data / "patient" / "series", stored, slice_gap=5.0)
    state = run_pretrain(capsys, tmp_path / "run", "--data", str(data))
    assert state["backbone_args"]["in_chans"] == 1


def test_pretrain_without_data_uses_the_phantoms(tmp_path: Path, capsys, single_thread) -> None:
    state = run_pretrain(capsys, tmp_path / "run")
    assert state["normalization"] == {"mean": [0.0], "std": [1.0]}


def test_pretrain_on_a_non_volume_exits_with_the_file_named(tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    argv = ["pretrain", "--domain", "medical", "--data", str(notes), "--out", str(tmp_path / "r"), *QUICK]
    assert main(argv) == 1
    assert f"{notes}: not a volume" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    argv = ["pretrain", "--domain", "medical", "--out", str(tmp_path / "d"), "ssl.method=dinov2"]
    assert main([*argv, "model.spatial_dims=3"]) == 1
    assert "runs DINOv2 on 2D slices" in capsys.readouterr().err


SLICES = RECIPES / "medical" / "dinov2_slices_tiny.yaml"


def test_slices_are_shown_radiologically_and_skip_air(tmp_path: Path) -> None:
    """An axial slice has anterior at the top and the patient's right on the viewer's left; air slices are
    redrawn."""
    volume = np.full((20, 20, 6), -1000.0, np.float32)  # RAS voxel order (identity affine): air
    volume[:, :, 2:4] = 40.0  # two slices of soft tissue
    volume[15:, 15:, 2:4] = 300.0  # right (+x) and anterior (+y) corner: brighter
    write_nifti(tmp_path / "v.nii.gz", volume, np.eye(4))
    cfg = load_config(SLICES, ["data.options.spacing=null", "data.crops.global_size=16"])
    domain = MedicalDomain()
    source, spec = domain.sample_source(str(tmp_path), cfg)
    assert spec.spatial_dims == 2 and domain.default_spec.spatial_dims == 3
    for i in range(6):
        image = source.sample(i, torch.Generator().manual_seed(i))["image"]
        assert image.shape == (20, 20, 1) and image.dtype == np.float32
        assert image.mean() > 0.3  # a tissue slice, not air
        assert image[:5, :5].mean() > image[-5:, -5:].mean()  # bright corner at the top left
    views = domain.ssl_transform(cfg, spec)({"image": image}, torch.Generator().manual_seed(0))
    assert [v.shape for v in views["global_crops"]] == [(1, 16, 16)] * 2


def test_dinov2_pretraining_on_slices(tmp_path: Path, capsys, single_thread) -> None:
    argv = ["pretrain", "--config", str(SLICES), "--quiet", "--out", str(tmp_path / "run"), *QUICK]
    assert main([*argv, "data.crops.global_size=32", "data.crops.local_size=16", "model.img_size=32"]) == 0
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["backbone_args"]["spatial_dims"] == 2 and state["backbone_args"]["in_chans"] == 1
    assert state["step"] == 2
