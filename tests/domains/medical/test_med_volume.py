"""Reading volumes: orientation to RAS, resampling, NIfTI channels, intensity presets, bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, oblique_affine, write_nifti

from foundation.errors import ConfigError, DataError
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.source import VolumeSampleSource, random_crop
from foundation_domains.medical.volume import find_volumes, load_volume, read_image

NATIVE = VolumeOptions(spacing=None)


def marker_volume(shape=(30, 24, 16), at=(7, 17, 11), radius: int = 0) -> np.ndarray:
    """Air with a bright cube of side ``2 * radius + 1`` centred on voxel ``at``."""
    data = np.full(shape, -1000, np.int16)
    data[tuple(slice(a - radius, a + radius + 1) for a in at)] = 1000
    return data


def marker_world(volume) -> np.ndarray:
    """World position of the centre of the brightest voxels (the window clips the marker to a plateau)."""
    image = volume.array[0].numpy()
    ijk = np.argwhere(image >= image.max() - 1e-6).mean(axis=0)
    return (volume.affine @ [*ijk, 1])[:3]


@pytest.mark.parametrize("affine", [lps_affine(), oblique_affine()], ids=["lps", "oblique"])
def test_reorientation_to_ras_keeps_world_positions(tmp_path: Path, affine: np.ndarray) -> None:
    at = (7, 17, 11)
    path = write_nifti(tmp_path / "marker.nii.gz", marker_volume(at=at), affine)
    volume = load_volume(path, NATIVE)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    np.testing.assert_allclose(marker_world(volume), (affine @ [*at, 1])[:3], atol=1e-4)
    assert float(volume.array.max()) == 1.0 and float(volume.array.min()) == 0.0  # HU window to [0, 1]


def test_resampling_reaches_the_target_spacing_and_keeps_the_field_of_view(tmp_path: Path) -> None:
    affine = lps_affine(spacing=(0.75, 0.75, 5.0))
    at = (20, 10, 6)
    path = write_nifti(tmp_path / "aniso.nii", marker_volume((40, 30, 20), at, radius=2), affine)
    volume = load_volume(path, VolumeOptions(spacing=(1.5, 1.5, 2.0)))
    assert tuple(volume.array.shape) == (1, 20, 15, 50)
    np.testing.assert_allclose(volume.spacing, (1.5, 1.5, 2.0))
    centre = lambda aff, shape: (aff @ [*((np.array(shape) - 1) / 2), 1])[:3]  # noqa: E731
    np.testing.assert_allclose(centre(volume.affine, (20, 15, 50)), centre(affine, (40, 30, 20)), atol=1e-6)
    np.testing.assert_allclose(marker_world(volume), (affine @ [*at, 1])[:3], atol=2.5)  # within a voxel


def test_multichannel_nifti_needs_the_channels_option(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(100, 30, (12, 10, 8, 2)).astype(np.float32)
    path = write_nifti(tmp_path / "t1_t2.nii.gz", data, lps_affine())
    with pytest.raises(DataError, match=r"t1_t2\.nii\.gz: 2 channel.*data\.options\.channels=2"):
        load_volume(path, NATIVE)
    volume = load_volume(path, VolumeOptions(spacing=None, modality="mr", channels=2))
    assert volume.array.shape == (2, 12, 10, 8)
    for c in range(2):  # 0.5 / 99.5 percentiles per channel
        assert float(volume.array[c].min()) == 0.0 and float(volume.array[c].max()) == 1.0
        assert 0.3 < float(volume.array[c].mean()) < 0.7
    flipped = data[::-1, ::-1, :, 1]  # LPS -> RAS flips i and j
    assert np.corrcoef(volume.array[1].numpy().ravel(), flipped.ravel())[0, 1] > 0.99  # same voxels


def test_non_volume_files_are_refused_by_name(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    with pytest.raises(DataError, match="notes.txt: not a volume"):
        find_volumes(notes)
    with pytest.raises(DataError, match="notes.txt: not a volume"):
        load_volume(notes, NATIVE)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="broken.nii.gz"):
        read_image(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no volumes here")
    with pytest.raises(DataError, match="no NIfTI files"):
        find_volumes(empty)


def test_find_volumes_recurses_and_ignores_other_files(tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "a" / "ct.nii.gz", marker_volume(), lps_affine())
    b = write_nifti(tmp_path / "b" / "c" / "mr.nii", marker_volume(), lps_affine())
    (tmp_path / "a" / "report.pdf").write_bytes(b"%PDF")
    assert find_volumes(tmp_path) == [a, b]


def test_a_volume_smaller_than_the_crop_is_padded(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "small.nii.gz", np.full((10, 12, 6), 100, np.int16), lps_affine())
    source = VolumeSampleSource([path], NATIVE, size=32)
    image = source.sample(0, torch.Generator().manual_seed(0))["image"]
    assert image.shape == (1, 32, 32, 32) and image.dtype == torch.float32
    inside = (100 + 175) / 425
    assert int(((image - inside).abs() < 1e-6).sum()) == 10 * 12 * 6  # all of the volume, once
    assert float(image.min()) == 0.0  # the rest is background


def test_random_crop_is_deterministic_and_inside_the_volume() -> None:
    x = torch.arange(40 * 50 * 30, dtype=torch.float32).view(1, 40, 50, 30)
    a = random_crop(x, 16, torch.Generator().manual_seed(3))
    b = random_crop(x, 16, torch.Generator().manual_seed(3))
    assert a.shape == (1, 16, 16, 16) and torch.equal(a, b)
    assert torch.isin(a, x).all()


def test_unknown_or_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data.options.spacng is not an option of the medical domain"):
        VolumeOptions.from_options({"spacng": [1, 1, 1]})
    with pytest.raises(ConfigError, match="modality"):
        VolumeOptions.from_options({"modality": "pet"})
    assert VolumeOptions.from_options({"spacing": 2}).spacing == (2.0, 2.0, 2.0)
