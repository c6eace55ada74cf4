"""Labelled axial slices for kNN / linear probes of slice backbones: read exactly as pretraining reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from med_testdata import write_nifti

from foundation.errors import DataError
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.slices import LabelledSliceDataset, SliceSampleSource

CT = VolumeOptions(spacing=None, window=(0.0, 100.0))


def _volume(value: float, slices: int) -> np.ndarray:
    """A RAS volume (identity affine) of ``slices`` axial slices, brighter at its right-anterior corner."""
    volume = np.full((12, 12, slices), value, np.float32)
    volume[8:, 8:] = 100.0
    return volume


def test_every_slice_is_an_item_of_its_folder_class_as_pretraining_sees_it(tmp_path: Path) -> None:
    write_nifti(tmp_path / "liver" / "a.nii.gz", _volume(20.0, 3), np.eye(4))
    write_nifti(tmp_path / "spleen" / "b.nii.gz", _volume(60.0, 2), np.eye(4))
    data = LabelledSliceDataset(tmp_path, CT, 12, (0.0,), (1.0,))
    assert data.classes == ["liver", "spleen"] and len(data) == 5
    assert [data[i]["label"] for i in range(5)] == [0, 0, 0, 1, 1]
    item = data[3]
    assert item["image"].shape == (1, 12, 12) and item["id"].endswith("b.nii.gz:0")
    assert item["image"][0, 0, 0] == pytest.approx(1.0)  # right-anterior corner at the top left
    assert item["image"][0, -1, -1] == pytest.approx(0.6)
    source = SliceSampleSource([tmp_path / "spleen" / "b.nii.gz"], CT, 12)
    sample = source.sample(0, torch.Generator().manual_seed(0))["image"]  # H x W x C
    np.testing.assert_allclose(item["image"].numpy(), sample.transpose(2, 0, 1), atol=1e-6)


def test_volumes_outside_class_folders_are_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", _volume(20.0, 2), np.eye(4))
    with pytest.raises(DataError, match="class sub-folders"):
        LabelledSliceDataset(tmp_path, CT, 12, (0.0,), (1.0,))


def test_slice_runs_standardise_with_the_slices_own_statistics(tmp_path: Path) -> None:
    from foundation.config import load_config
    from foundation_domains.medical.domain import MedicalDomain
    from foundation_domains.medical.slices import slice_statistics

    write_nifti(tmp_path / "train" / "a.nii.gz", _volume(20.0, 4), np.eye(4))
    cfg = load_config(
        None,
        ["model.spatial_dims=2", "data.options.spacing=null", "data.options.window=[0,100]", "seed=3"],
        domain="medical",
    )
    domain = MedicalDomain()
    source, spec = domain.sample_source(str(tmp_path / "train"), cfg)
    # every slice: 0.2 except the bright 4x4 corner (1.0) of 12x12: mean 0.289, std 0.251
    assert spec.mean[0] == pytest.approx(0.2 + 0.8 * 16 / 144, abs=1e-4)
    assert spec.std[0] == pytest.approx(0.8 * np.sqrt(16 / 144 * (1 - 16 / 144)), abs=1e-4)
    assert (spec.mean, spec.std) == tuple(map(tuple, slice_statistics(source, 3)))  # deterministic
    state = torch.random.get_rng_state()
    slice_statistics(source, 3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream is untouched
    # the evaluation hook reads labelled slices with those statistics
    write_nifti(tmp_path / "eval" / "liver" / "b.nii.gz", _volume(20.0, 2), np.eye(4))
    data = domain.eval_dataset(str(tmp_path / "eval"), cfg, spec)
    assert data.classes == ["liver"] and data[0]["image"][0, -1, -1] == pytest.approx(
        (0.2 - spec.mean[0]) / spec.std[0]
    )
