"""DICOM series to a RAS NIfTI image in memory: one series per folder, slices in patient order, HU values.

Slices are sorted by ImagePositionPatient projected on the slice normal (never by file name or
InstanceNumber, which scanners and anonymisers reorder), and the affine is built from the patient geometry.
DICOM is LPS; flipping the first two world axes gives RAS, which nibabel and MONAI use.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from foundation.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NOT_DICOM = {".nii", ".json", ".txt", ".md", ".csv", ".png", ".jpg", ".pdf", ".xml", ".h5", ".pt", ".yaml"}


def is_dicom_file(path: Path) -> bool:
    """``.dcm``/``.ima`` files, or others with the ``DICM`` marker after the 128-byte preamble (scanners
    often name files by UID, ``1.3.12.2...``, or omit the suffix)."""
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".ima"):
        return True
    if suffix in NOT_DICOM or path.name.lower().endswith(".nii.gz"):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    out = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p)):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as e:
            raise DataError(f"{f}: not a readable DICOM file ({e})") from e
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:  # skip DICOMDIR, reports
            out.append((f, ds))
    if not out:
        raise DataError(f"{folder}: no DICOM images with ImagePositionPatient/ImageOrientationPatient")
    return out


def series_geometry(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Slice files in patient order and the voxel -> RAS affine (i along columns, j along rows, k slices).

    Raises:
        DataError: the folder mixes series or orientations, or its slices are unevenly spaced (missing
            slices), naming the folder.
    """
    items = _headers(folder)
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in items})
    if len(uids) > 1:
        raise DataError(
            f"{folder}: mixes {len(uids)} DICOM series ({', '.join(uids[:3])}...); put each series "
            "(SeriesInstanceUID) in its own folder"
        )
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    if not np.allclose(iop, iop[0], atol=1e-4):
        raise DataError(f"{folder}: slices have different ImageOrientationPatient; not one volume")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices have different sizes {sorted(shapes)}")
    row_dir, col_dir = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    order = np.argsort(pos @ normal, kind="stable")
    pos, files = pos[order], [items[i][0] for i in order]
    first = items[order[0]][1]
    if len(files) > 1:
        gaps = np.diff(pos @ normal)
        step = float(np.median(gaps))
        if gaps.min() <= 1e-3 or np.abs(gaps - step).max() > 0.1 * step + 1e-3:
            raise DataError(
                f"{folder}: uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm between "
                f"{len(files)} slices): missing or duplicate slices?"
            )
        slice_vec = (pos[-1] - pos[0]) / (len(files) - 1)
    else:
        slice_vec = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in first.get("PixelSpacing", (1.0, 1.0)))  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dx, col_dir * dy, slice_vec, pos[0]
    return files, LPS_TO_RAS @ lps


def read_dicom_series(folder: Path) -> nib.Nifti1Image:
    """The series in ``folder`` as float32 HU (RescaleSlope/Intercept applied per slice).

    Raises:
        DataError: see :func:`series_geometry`; also undecodable or multi-frame pixel data.
    """
    files, affine = series_geometry(folder)
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except Exception as e:  # codec missing, truncated file
            raise DataError(f"{f}: cannot decode DICOM pixel data ({e})") from e
        if pixels.ndim != 2:
            raise DataError(f"{f}: pixel data of shape {pixels.shape}; only single-frame grayscale slices")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(pixels.T.astype(np.float32) * slope + intercept)  # rows x cols -> i (cols), j (rows)
    return nib.Nifti1Image(np.stack(slices, axis=-1), affine)
