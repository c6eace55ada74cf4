"""Volumes to training arrays: find NIfTI files and DICOM series, reorient to RAS, resample, apply the
modality's intensity preset.

Arrays are channel-first ``C x X x Y x Z`` in RAS+ voxel order, as MONAI keeps them after
``Orientation("RAS")``, so a model trained here sees the same layout as a MONAI pipeline. NaN and infinite voxels
are missing data: left out of the intensity statistics, set to background, reported; a volume with nothing else
is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from foundation.errors import DataError
from foundation_domains.medical.dicom import is_dicom_file, read_dicom_series
from foundation_domains.medical.options import VolumeOptions

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
BACKGROUND = 0.0  # value of air / outside the body after either intensity preset


@dataclass
class Volume:
    array: torch.Tensor  # C x X x Y x Z float32
    affine: np.ndarray  # voxel -> RAS world, mm
    nonfinite_fraction: float = 0.0  # share of the values that were NaN or infinite (now background)

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_volumes(path: str | Path) -> list[Path]:
    """NIfTI files and DICOM series folders at ``path`` (searched recursively), or the images listed in
    its Decathlon ``dataset.json`` (so label maps next to them are not pretrained on).

    Raises:
        DataError: nothing usable, or ``path`` is a file that is not a volume; the message names it.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if root.is_file():
        if is_nifti(root):
            return [root]
        raise DataError(f"{root}: not a volume; expected a .nii/.nii.gz file or a folder of DICOM series")
    if (root / "dataset.json").is_file():
        return _decathlon_images(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        files = [here / f for f in sorted(filenames)]
        found += [f for f in files if is_nifti(f)]
        if any(is_dicom_file(f) for f in files):
            found.append(here)
    if not found:
        raise DataError(f"{root}: no NIfTI files (.nii, .nii.gz) or DICOM series found")
    return found


def _decathlon_images(root: Path) -> list[Path]:
    try:
        meta = json.loads((root / "dataset.json").read_text())
        entries = list(meta.get("training", [])) + list(meta.get("test", []))
        images = [root / (e["image"] if isinstance(e, dict) else e) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{root / 'dataset.json'}: not a Decathlon dataset.json ({e})") from e
    missing = [str(p) for p in images if not p.exists()]
    if missing or not images:
        raise DataError(f"{root / 'dataset.json'}: lists missing images {missing[:3]} or none at all")
    return [p.resolve() for p in images]


def read_image(path: Path) -> nib.Nifti1Image:
    """A NIfTI file or DICOM series folder as a nibabel image (lazy for NIfTI: header only).

    Raises:
        DataError: unreadable or not a volume, naming the file.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not is_nifti(path):
        raise DataError(f"{path}: not a volume; expected a .nii/.nii.gz file or a folder of DICOM series")
    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: not a readable NIfTI volume ({e})") from e


def channel_count(img: nib.Nifti1Image, path: Path, expected: int | None) -> int:
    """Channels of a 3D (1), 4D (channels last) or 5D (x, y, z, 1, c) image, checked against ``expected``.

    Raises:
        DataError: not a volume, or a channel count the options do not allow.
    """
    shape = img.shape
    if len(shape) == 3:
        channels = 1
    elif len(shape) == 4 or (len(shape) == 5 and shape[3] == 1):
        channels = shape[-1]
    else:
        raise DataError(
            f"{path}: image of shape {shape} is not a 3D volume or a 4D volume with channels last"
        )
    if expected is not None and channels != expected:
        raise DataError(
            f"{path}: {channels} channel(s) (shape {shape}) where {expected} are expected; set "
            f"data.options.channels={channels} (or data.options.modality=mr) to train on multi-channel volumes"
        )
    return channels


def resample(array: torch.Tensor, affine: np.ndarray, spacing) -> tuple[torch.Tensor, np.ndarray]:
    """Trilinear resampling of ``C x X x Y x Z`` to about ``spacing`` mm, keeping the field of view.

    The voxel grid is scaled by ``n_old / n_new`` per axis (align_corners=False), so the returned affine
    is exact for the array returned, and its spacing is the target up to rounding of the voxel count.
    """
    shape = np.array(array.shape[1:])
    old = np.linalg.norm(affine[:3, :3], axis=0)
    new_shape = np.maximum(1, np.round(shape * old / np.asarray(spacing))).astype(int)
    if (new_shape == shape).all():
        return array, affine
    out = F.interpolate(
        array[None], size=tuple(int(n) for n in new_shape), mode="trilinear", align_corners=False
    )
    scale = shape / new_shape
    grid = np.diag([*scale, 1.0])
    grid[:3, 3] = 0.5 * scale - 0.5  # centre of new voxel 0 in old voxel coordinates
    return out[0], affine @ grid


def intensity_preset(
    array: torch.Tensor, opts: VolumeOptions, missing: torch.Tensor | None = None
) -> torch.Tensor:
    """CT: HU window to [0, 1]. MR: 0.5th..99.5th percentile of each channel to [0, 1], clipped. ``missing``
    voxels (a boolean mask like ``array``) are left out of the percentiles and set to background."""
    if opts.modality == "ct":
        low, high = opts.window
        out = ((array.clamp(low, high) - low) / (high - low)).float()
    else:
        out = torch.empty_like(array)
        for c in range(array.shape[0]):
            values = array[c] if missing is None else array[c][~missing[c]]
            if values.numel() == 0:  # a channel with no data at all
                out[c] = BACKGROUND
                continue
            low, high = np.percentile(values.numpy(), (0.5, 99.5))  # torch.quantile caps the input size
            out[c] = ((array[c] - low) / max(high - low, 1e-6)).clamp(0, 1)
    if missing is not None:
        out[missing] = BACKGROUND
    return out


def load_volume(path: str | Path, opts: VolumeOptions) -> Volume:
    """Read, reorient to RAS, resample to ``opts.spacing`` and apply the intensity preset. NaN and infinite
    voxels are missing data: left out of the intensity statistics and set to background; their share is
    ``Volume.nonfinite_fraction`` (and a warning).

    Raises:
        DataError: the file or folder is not a usable volume, or every voxel is NaN or infinite; the message
            names it.
    """
    path = Path(path)
    img = read_image(path)
    channel_count(img, path, opts.expected_channels)
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as e:
        raise DataError(f"{path}: cannot read the voxel data ({e})") from e
    data = data.reshape(*data.shape[:3], -1)  # channels last: 3D -> 1, 5D (x, y, z, 1, c) -> c
    missing = ~np.isfinite(data)
    fraction = float(missing.mean()) if missing.any() else 0.0
    if fraction == 1.0:
        raise DataError(f"{path}: every voxel is NaN or infinite (no data); nothing to train on")
    array = _channels_first(np.where(missing, _background_intensity(data, missing, opts), data))
    affine = canonical.affine
    mask = _channels_first(missing.astype(np.float32)) if fraction else None
    if opts.spacing is not None:
        array, new_affine = resample(array, affine, opts.spacing)
        mask = None if mask is None else resample(mask, affine, opts.spacing)[0]
        affine = new_affine
    if fraction:
        log.warning(
            "%s: %.1f%% of the voxel values are NaN or infinite; treated as missing (background)",
            path, 100 * fraction,
        )  # fmt: skip
    holes = None if mask is None else mask >= 0.5
    return Volume(intensity_preset(array, opts, holes), affine, fraction)


def _channels_first(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0), dtype=np.float32))


def _background_intensity(data: np.ndarray, missing: np.ndarray, opts: VolumeOptions) -> np.ndarray:
    """Per channel, the intensity missing voxels are given before resampling (neutral at the borders of a
    hole): the bottom of the CT window, or the channel's smallest finite value for MR."""
    if opts.modality == "ct":
        return np.full(data.shape[-1], opts.window[0], np.float32)
    present = np.where(missing, np.inf, data).reshape(-1, data.shape[-1]).min(axis=0)
    return np.where(np.isfinite(present), present, 0.0).astype(np.float32)
