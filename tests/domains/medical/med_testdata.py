"""Volumes written by the medical tests themselves: NIfTI with chosen affines and DICOM series."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def lps_affine(spacing=(0.8, 0.8, 3.0), origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    """Voxel order as many DICOM converters leave it: i to the left, j to posterior, k superior."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def oblique_affine(spacing=(0.7, 1.1, 2.5), degrees=20.0, origin=(-30.0, 12.0, 40.0)) -> np.ndarray:
    """Axis-swapped and rotated 20 degrees about the superior axis: a tilted acquisition."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    swap = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # i runs along A, j along L (before the rotation)
    affine = np.eye(4)
    affine[:3, :3] = rot @ swap.T @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    *,
    spacing=(0.7, 0.9),
    slice_gap=2.5,
    origin=(-40.0, -30.0, 100.0),
    slope=2.0,
    intercept=-1024.0,
    skip: tuple[int, ...] = (),
    order: list[int] | None = None,
    series_uid: str | None = None,
) -> Path:
    """``stored`` is ``rows x cols x slices`` uint16; slice ``k`` sits ``k * slice_gap`` mm superior.

    Files are named in ``order`` (shuffled on disk when given), with InstanceNumber following the names,
    so only ImagePositionPatient tells the true order. ``skip`` leaves slices out (a gap).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols, n = stored.shape
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    for name_index, k in enumerate(order or range(n)):
        if k in skip:
            continue
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.PatientID = "CT", "TEST"
        ds.InstanceNumber = name_index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * slice_gap]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # between rows, between columns
        ds.SliceThickness = slice_gap
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].astype(np.uint16)).tobytes()
        ds.save_as(folder / f"IM{name_index:04d}.dcm", enforce_file_format=True)
    return folder


def three_class_seg_meta():
    """A stored segmentation model's metadata: 16 voxel ROI, CT window, background / organ / an absent organ."""
    from foundation_domains.medical.segmentation.meta import SegmentationMeta

    return SegmentationMeta.from_dict(
        {
            "head": {},
            "in_chans": 1,
            "roi_size": [16, 16, 16],
            "spacing": None,
            "modality": "ct",
            "window": [-175.0, 250.0],
            "labels": {"background": 0, "organ": 1, "absent": 2},
            "num_classes": 3,
            "overlap": 0.5,
            "sw_batch_size": 2,
        },
        "test-model.pt",
    )
