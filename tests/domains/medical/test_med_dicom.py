"""DICOM series: HU rescale, slice order from ImagePositionPatient, LPS -> RAS, broken series refused."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from med_testdata import write_dicom_series
from pydicom.uid import generate_uid

from foundation.errors import DataError
from foundation_domains.medical.dicom import read_dicom_series
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.volume import find_volumes, load_volume

ROWS, COLS, SLICES = 12, 16, 6


def stored_values() -> np.ndarray:
    """Slice ``k`` holds ``100 * k + 10`` plus a ramp along the columns, so order and axes are visible."""
    k = np.arange(SLICES)[None, None, :]
    col = np.arange(COLS)[None, :, None]
    return np.broadcast_to(100 * k + 10 + col, (ROWS, COLS, SLICES)).astype(np.uint16)


def test_hu_rescale_and_slice_order_shuffled_on_disk(tmp_path: Path) -> None:
    order = [3, 0, 5, 1, 4, 2]  # file names and InstanceNumber in this order, not by position
    folder = write_dicom_series(tmp_path / "ct", stored_values(), slope=2.0, intercept=-1024.0, order=order)
    img = read_dicom_series(folder)
    data = img.get_fdata()
    assert data.shape == (COLS, ROWS, SLICES)  # i along columns, j along rows, k slices
    expected = stored_values().transpose(1, 0, 2) * 2.0 - 1024.0
    np.testing.assert_allclose(data, expected)
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), (0.9, 0.7, 2.5))


def test_dicom_voxels_land_at_their_patient_position_in_ras(tmp_path: Path) -> None:
    stored = np.full((ROWS, COLS, SLICES), 24, np.uint16)  # 2 * 24 - 1024 = -976 HU: air
    row, col, k = 3, 11, 4
    stored[row, col, k] = 1000  # 976 HU: clipped to 1 by the window
    origin = (-40.0, -30.0, 100.0)  # LPS mm of the first voxel of slice 0
    folder = write_dicom_series(tmp_path / "ct", stored, origin=origin, order=[5, 4, 3, 2, 1, 0])
    volume = load_volume(folder, VolumeOptions(spacing=None))
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    ijk = np.unravel_index(int(volume.array[0].argmax()), volume.array.shape[1:])
    lps = np.array(origin) + [col * 0.9, row * 0.7, k * 2.5]  # columns step PixelSpacing[1]
    np.testing.assert_allclose((volume.affine @ [*ijk, 1])[:3], lps * [-1, -1, 1])


def test_a_missing_slice_is_refused_naming_the_folder(tmp_path: Path) -> None:
    folder = write_dicom_series(tmp_path / "series_with_gap", stored_values(), skip=(3,))
    with pytest.raises(DataError, match=r"series_with_gap: uneven slice spacing.*missing"):
        read_dicom_series(folder)


def test_a_folder_mixing_series_is_refused(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "mixed", stored_values()[:, :, :3], series_uid=generate_uid())
    other = stored_values()[:, :, :3]
    write_dicom_series(tmp_path / "other", other, series_uid=generate_uid(), origin=(0.0, 0.0, 0.0))
    for f in sorted((tmp_path / "other").iterdir()):
        f.rename(tmp_path / "mixed" / f"B{f.name}")
    with pytest.raises(DataError, match=r"mixed: mixes 2 DICOM series"):
        read_dicom_series(tmp_path / "mixed")


def test_series_folders_are_found_next_to_nifti(tmp_path: Path) -> None:
    a = write_dicom_series(tmp_path / "patient1" / "series_a", stored_values())
    b = write_dicom_series(tmp_path / "patient2" / "series_b", stored_values())
    for i, f in enumerate(sorted(b.iterdir())):  # scanners often name files by UID, without .dcm
        f.rename(b / f"1.2.826.0.1.{i}")
    (b / "DICOMDIR.txt").write_text("index")
    assert find_volumes(tmp_path) == [a, b]
    assert read_dicom_series(b).shape == (COLS, ROWS, SLICES)
