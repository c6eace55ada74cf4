"""Whole-volume inference: preprocess, sliding window, argmax, and the labels put back on the input's own grid.

The network sees what it was trained on (the task's MONAI preprocessing: RAS orientation, target spacing,
intensity preset), through MONAI's ``sliding_window_inference`` with the task's ROI, overlap and Gaussian
blending. The label map is then resampled by nearest neighbour onto the input voxel grid (same shape, same
affine) through the two affines: axis by axis when the grids share their axes, slab by slab for oblique
acquisitions, so labels are never interpolated and a CT of 512 x 512 x 300 needs no full-size coordinate grid.

Memory: windows run on ``device``; the stitched logits (``K x`` the preprocessed grid, float32) stay on the GPU
when they take under half of its free memory, otherwise they are accumulated on the CPU (``stitch="cpu"``
forces this). A CUDA out-of-memory error while stitching on the GPU is retried once with CPU stitching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from foundation.errors import ConfigError, DataError
from foundation.precision import autocast_dtype, resolve_precision
from foundation_domains.medical.segmentation.meta import SegmentationMeta
from foundation_domains.medical.segmentation.transforms import normalise_intensity
from foundation_domains.medical.volume import is_nifti, read_image

log = logging.getLogger(__name__)

STITCH_CHOICES = ("auto", "cpu", "device")
_SLAB_VOXELS = 1 << 22  # voxels of the input grid resampled per step (a few tens of MB of coordinates)


def input_grid(path: Path, in_chans: int) -> nib.Nifti1Image:
    """The input as a nibabel image (header only for NIfTI, pixels for a DICOM series), checked to hold a
    ``in_chans``-channel 3D volume.

    Raises:
        DataError: not a volume, unreadable, a DICOM folder mixing series or missing slices, a 2D image, or a 4D
            image whose fourth axis is not the model's channel count; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and not is_nifti(path):
        raise DataError(
            f"{path}: not a volume; expected a .nii/.nii.gz file or a folder holding one DICOM series"
        )
    img = read_image(path)
    shape = tuple(int(s) for s in img.shape)
    channels = 1 if len(shape) == 3 else shape[3] if len(shape) == 4 else None
    if channels is None:
        raise DataError(
            f"{path}: image of shape {shape} is not a 3D volume (x, y, z) or channels-last 4D volume"
        )
    if channels != in_chans:
        what = "a 3D volume" if in_chans == 1 else f"a 4D volume with {in_chans} channels last"
        raise DataError(
            f"{path}: shape {shape} ({channels} channel(s)) where the model expects {what}; "
            "split 4D series (time, echoes) into 3D files first"
        )
    if min(shape[:3]) < 1:
        raise DataError(f"{path}: empty volume of shape {shape}")
    return img


def nearest_to_grid(
    labels: torch.Tensor,
    labels_affine: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    dtype: np.dtype = np.uint8,
) -> np.ndarray:
    """Labels ``X x Y x Z`` with voxel->world ``labels_affine`` resampled by nearest neighbour onto the grid
    ``shape`` / ``affine``; world points more than one voxel outside ``labels`` get background (0).

    When the two grids share their axes (up to order, flips and scale: any volume not acquired obliquely) the
    lookup is separable, three 1D gathers. Otherwise ``inv(labels_affine) @ affine`` is applied one slab of the
    output at a time, so memory stays at a few tens of MB of coordinates whatever the volume size.
    """
    labels = labels.to("cpu")
    size = torch.tensor(labels.shape, dtype=torch.float64)
    flat = labels.reshape(-1)
    m = torch.from_numpy(
        np.linalg.inv(np.asarray(labels_affine, np.float64)) @ np.asarray(affine, np.float64)
    )
    nx, ny, nz = (int(s) for s in shape)
    nonzero = m[:3, :3].abs() > 1e-6 * m[:3, :3].abs().max()
    if (nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all():
        return _separable(labels, m, nonzero, (nx, ny, nz)).numpy().astype(dtype, copy=False)
    out = np.zeros((nx, ny, nz), dtype=dtype)
    ii = torch.arange(nx, dtype=torch.float64).view(-1, 1, 1)
    jj = torch.arange(ny, dtype=torch.float64).view(1, -1, 1)
    step = max(1, _SLAB_VOXELS // max(1, nx * ny))
    for k0 in range(0, nz, step):
        kk = torch.arange(k0, min(nz, k0 + step), dtype=torch.float64).view(1, 1, -1)
        valid = torch.ones((nx, ny, kk.shape[-1]), dtype=torch.bool)
        index = torch.zeros((nx, ny, kk.shape[-1]), dtype=torch.int64)
        for c in range(3):
            coord = m[c, 0] * ii + m[c, 1] * jj + m[c, 2] * kk + m[c, 3]
            valid &= (coord > -1.0) & (coord < size[c])  # tolerance of one voxel at the border
            index = index * labels.shape[c] + torch.round(coord).clamp(0, size[c] - 1).long()
        slab = torch.where(valid, flat[index], torch.zeros((), dtype=flat.dtype))
        out[:, :, k0 : k0 + kk.shape[-1]] = slab.numpy().astype(dtype, copy=False)
    return out


def _separable(
    labels: torch.Tensor, m: torch.Tensor, nonzero: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Nearest-neighbour lookup when output axis ``c`` runs along one label axis only: gather axis by axis."""
    axes = [int(nonzero[:, c].nonzero()) for c in range(3)]  # the label axis of each output axis
    out = labels.permute(*axes)
    for c, n in enumerate(shape):
        p = axes[c]
        coord = m[p, c] * torch.arange(n, dtype=torch.float64) + m[p, 3]
        outside = (coord <= -1.0) | (coord >= labels.shape[p])  # tolerance of one voxel at the border
        out = out.index_select(c, torch.round(coord).clamp(0, labels.shape[p] - 1).long())
        out.index_fill_(c, outside.nonzero().view(-1), 0)
    return out


def label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.int16)


class Segmenter:
    """A fine-tuned segmentation network and its inference settings, applied volume by volume.

    Args:
        net: ``B x C x D x H x W -> B x K x D x H x W`` logits.
        meta: the model's :class:`SegmentationMeta` (ROI, overlap, windows per pass, channels, classes and the
            preprocessing).
        device: where the windows run.
        overlap / sw_batch_size: override the checkpoint's values.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        stitch: where the logits are accumulated: ``auto``, ``cpu`` or ``device`` (see the module docstring).
    """

    def __init__(
        self,
        net: nn.Module,
        meta: SegmentationMeta,
        device: torch.device | str = "cpu",
        *,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        precision: str = "auto",
        stitch: str = "auto",
    ) -> None:
        if stitch not in STITCH_CHOICES:
            raise ConfigError(f"--stitch {stitch!r} is not one of {list(STITCH_CHOICES)}")
        self.device = torch.device(device)
        resolve_precision(precision, self.device)  # refused by name before the model moves
        self.net = net.to(self.device).eval()
        self.meta = meta
        self.roi_size = tuple(meta.roi_size)
        self.overlap = float(meta.overlap if overlap is None else overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"--overlap {self.overlap!r} must be in [0, 1)")
        self.sw_batch_size = int(sw_batch_size or meta.sw_batch_size or 1)
        self.precision = resolve_precision(precision, self.device)  # "auto": bf16 on CUDA, else fp32
        self.amp_dtype = autocast_dtype(self.precision, self.device)
        self.stitch = stitch
        self.in_chans = meta.in_chans
        self.num_classes = meta.num_classes
        self._preprocess = None
        self._settings_key: dict[str, Any] | None = None

    def settings_key(self) -> dict[str, Any]:
        """What decides the labels, as JSON: the weights (not the checkpoint's path: a model retrained in place
        is another model), the task metadata (preprocessing, classes), ROI, overlap and precision. Batch size,
        stitching and device change speed and memory, not the labels, so they are left out."""
        from foundation.models.fingerprint import weights_fingerprint

        if self._settings_key is None:
            meta = json.dumps(self.meta.to_dict(), sort_keys=True, default=str).encode()
            self._settings_key = {
                "weights": weights_fingerprint(self.net),
                "meta": hashlib.sha256(meta).hexdigest()[:16],
                "roi_size": list(self.roi_size),
                "overlap": self.overlap,
                "precision": self.precision,
            }
        return self._settings_key

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path, device: torch.device | str = "cpu", **kwargs: Any
    ) -> Segmenter:
        """Raises: CheckpointError (unreadable, not an organ-segmentation model, weights that do not fit)."""
        from foundation_domains.medical.segmentation.model import load_segmentation

        model = load_segmentation(checkpoint)
        return cls(model.net, model.meta, device, **kwargs)

    @property
    def preprocess(self):
        if self._preprocess is None:
            from foundation_domains.medical.segmentation.transforms import preprocessing

            self._preprocess = preprocessing(self.meta, keys=("image",))
        return self._preprocess

    # -- the network part ----------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            return self.net(x).float()

    def _stitch_device(self, spatial: Sequence[int]) -> torch.device:
        if self.device.type != "cuda" or self.stitch == "cpu":
            return torch.device("cpu")
        if self.stitch == "device":
            return self.device
        need = (self.num_classes + 2) * math.prod(spatial) * 4  # logits, count map, argmax
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free // 2 else torch.device("cpu")

    def logits(self, image: torch.Tensor, stitch_device: torch.device | None = None) -> torch.Tensor:
        """Sliding-window logits ``K x D x H x W`` of a preprocessed ``C x D x H x W`` image (smaller sides are
        padded to the ROI by MONAI and cropped back)."""
        from monai.inferers import sliding_window_inference

        image = torch.as_tensor(image).float()  # a plain tensor: no MetaTensor bookkeeping per window
        out_device = stitch_device or self._stitch_device(image.shape[1:])
        with torch.inference_mode():
            logits = sliding_window_inference(
                image[None].to(out_device),
                roi_size=self.roi_size,
                sw_batch_size=self.sw_batch_size,
                predictor=self._forward,
                overlap=self.overlap,
                mode="gaussian",
                sw_device=self.device,
                device=out_device,
            )
        return logits[0]

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Argmax labels ``D x H x W`` (on the CPU) of a preprocessed ``C x D x H x W`` image."""
        out_device = self._stitch_device(image.shape[1:])
        try:
            labels = self.logits(image, out_device).argmax(0)
        except torch.OutOfMemoryError:
            if out_device.type == "cpu":
                raise
            log.warning(
                "out of GPU memory stitching %s logits on the GPU; retrying on the CPU",
                tuple(image.shape[1:]),
            )
            torch.cuda.empty_cache()
            labels = self.logits(image, torch.device("cpu")).argmax(0)
        return labels.to("cpu", torch.int16 if self.num_classes > 256 else torch.uint8)

    # -- a whole volume -----------------------------------------------------------------------------------------
    def load(self, path: Path) -> Preprocessed:
        """Read and check ``path``, then preprocess it as in training. NaN and infinite voxels are missing data:
        left out of the intensity statistics and given the background value (see :func:`normalise_intensity`).

        Raises:
            DataError: see :func:`input_grid`; every voxel NaN or infinite; a file MONAI cannot read or
                preprocess.
        """
        path = Path(path)
        img = input_grid(path, self.in_chans)
        if path.is_file() and stored_finite(img):  # MONAI reads the file itself, as a bundle does
            return self._preprocessed(self._run(self.preprocess, {"image": str(path)}, path), img, None)
        voxels = read_voxels(img, path)
        missing = ~np.isfinite(voxels)
        if missing.all():
            raise DataError(f"{path}: every voxel is NaN or infinite (no data); nothing to segment")
        if not missing.any():
            missing = None
        if missing is None and path.is_file():
            data = self._run(self.preprocess, {"image": str(path)}, path)
        else:
            with tempfile.TemporaryDirectory(prefix="foundation-segment-") as tmp:
                data = self._preprocess_voxels(voxels, missing, img, Path(tmp), path)
        return self._preprocessed(data, img, missing)

    def _preprocessed(
        self, data: dict[str, Any], img: nib.Nifti1Image, missing: np.ndarray | None
    ) -> Preprocessed:
        """MONAI's output as :class:`Preprocessed`; with missing voxels, the intensity preset that skips them."""
        pixels = data["image"].as_tensor()
        if missing is not None:
            pixels = normalise_intensity(pixels, data["missing"].as_tensor() > 0.5, self.meta)
        affine = np.asarray(torch.as_tensor(data["image"].affine).cpu(), dtype=np.float64)
        if missing is None:
            return Preprocessed(pixels, affine, img, None, 0.0)
        on_grid = missing if missing.ndim == 3 else missing.any(axis=3)
        return Preprocessed(pixels, affine, img, on_grid, float(missing.mean()))

    def _preprocess_voxels(
        self, voxels: np.ndarray, missing: np.ndarray | None, img: nib.Nifti1Image, tmp: Path, path: Path
    ) -> dict[str, Any]:
        """Preprocess voxels held in memory (a DICOM series, a volume with missing voxels) through temporary
        NIfTI files: the voxels, missing ones filled with a background value, and the mask of missing ones
        (resampled by nearest neighbour, like a label map)."""
        from foundation_domains.medical.segmentation.transforms import preprocessing

        source = tmp / "image.nii"
        filled = voxels if missing is None else fill_missing(voxels, missing, self.meta)
        nib.save(nib.Nifti1Image(filled, img.affine, _header_of(img)), source)
        if missing is None:
            return self._run(self.preprocess, {"image": str(source)}, path)
        mask = tmp / "missing.nii"
        nib.save(nib.Nifti1Image(missing.astype(np.uint8), img.affine, _header_of(img)), mask)
        spatial = preprocessing(self.meta, keys=("image",), label_key="missing", intensity=False)
        return self._run(spatial, {"image": str(source), "missing": str(mask)}, path)

    @staticmethod
    def _run(transform, item: dict[str, str], path: Path) -> dict[str, Any]:
        try:
            return transform(item)
        except Exception as e:  # MONAI wraps reader and transform errors in RuntimeError
            raise DataError(f"{path}: cannot be read or preprocessed ({_root_cause(e)})") from e

    def run(self, path: str | Path) -> Segmentation:
        """The label map of ``path`` on exactly its voxel grid (same shape and affine, qform/sform codes kept),
        missing (NaN or infinite) voxels labelled background, and what the batch reports about it.

        Raises:
            DataError: the input is not a usable volume (see :meth:`load`).
        """
        pre = self.load(Path(path))
        labels = self.predict(pre.image)
        dtype = label_dtype(self.num_classes)
        out = nearest_to_grid(labels, pre.affine, pre.grid.affine, pre.grid.shape[:3], dtype)
        present = out.size
        if pre.missing is not None:
            out[pre.missing] = 0
            present -= int(pre.missing.sum())
        return Segmentation(
            image=label_image(out, pre.grid),
            nonfinite_fraction=pre.nonfinite_fraction,
            foreground_fraction=float(np.count_nonzero(out)) / max(present, 1),
            has_signal=bool((pre.image > 0).any()),
        )

    def segment(self, path: str | Path) -> nib.Nifti1Image:
        """The label map of ``path`` (see :meth:`run`)."""
        return self.run(path).image


@dataclass(frozen=True)
class Preprocessed:
    """A volume as the network sees it, and the input grid its labels go back to."""

    image: torch.Tensor  # C x D x H x W, preprocessed
    affine: np.ndarray  # voxel -> world of ``image``
    grid: nib.Nifti1Image  # the input
    missing: np.ndarray | None  # X x Y x Z on the input grid: NaN or infinite in some channel; None if none
    nonfinite_fraction: float  # share of the input's values that were NaN or infinite


@dataclass(frozen=True)
class Segmentation:
    """A label map and the facts ``foundation segment`` reports with it."""

    image: nib.Nifti1Image
    nonfinite_fraction: float  # share of input values that were NaN or infinite (labelled background)
    foreground_fraction: float  # labelled voxels among those that were not missing
    has_signal: bool  # some preprocessed voxel is above background: an all-background map is then suspect


def stored_finite(img: nib.Nifti1Image) -> bool:
    """True when ``img``'s voxels cannot be NaN or infinite: integers on disk with a finite scaling."""
    if np.dtype(img.get_data_dtype()).kind not in "iub":
        return False
    scaling = [getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)]
    return all(s is None or np.isfinite(s) for s in scaling)


def read_voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel values as float32 (``X x Y x Z`` or ``X x Y x Z x C``). Raises: DataError naming ``path``."""
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises several types for truncated or corrupt data
        raise DataError(f"{path}: cannot read the voxel data ({e})") from e


def fill_missing(voxels: np.ndarray, missing: np.ndarray, meta: SegmentationMeta) -> np.ndarray:
    """``voxels`` with the missing ones set to a background intensity: the bottom of the CT window, or the
    smallest finite value of the channel for MR (both 0 after the preset, and neutral for resampling)."""
    filled = np.where(missing, 0.0, voxels).astype(np.float32)
    channels = filled.reshape(*filled.shape[:3], -1)
    holes = missing.reshape(channels.shape)
    for c in range(channels.shape[-1]):
        present = channels[..., c][~holes[..., c]]
        if meta.modality == "ct":
            background = float(meta.window[0])
        else:
            background = float(present.min()) if present.size else 0.0
        channels[..., c][holes[..., c]] = background
    return channels.reshape(filled.shape)


def _header_of(img: nib.Nifti1Image) -> nib.Nifti1Header | None:
    header = getattr(img, "header", None)
    if not isinstance(header, nib.Nifti1Header):
        return None
    header = header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)  # the values are already scaled
    return header


def label_image(labels: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    """``labels`` as a NIfTI image with the affine, qform and sform (and their codes) of ``like``."""
    out = nib.Nifti1Image(labels, like.affine)
    header = getattr(like, "header", None)
    if isinstance(header, nib.Nifti1Header):
        qform, qcode = like.get_qform(coded=True)
        sform, scode = like.get_sform(coded=True)
        out.set_qform(
            qform if qform is not None else like.affine, code=int(qcode) if qform is not None else 1
        )
        out.set_sform(
            sform if sform is not None else like.affine, code=int(scode) if sform is not None else 1
        )
        out.header.set_xyzt_units(*header.get_xyzt_units())
    else:
        out.set_qform(like.affine, code=1)
        out.set_sform(like.affine, code=1)
    out.set_data_dtype(labels.dtype)
    out.header["descrip"] = b"foundation segment: labels"
    return out


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"
