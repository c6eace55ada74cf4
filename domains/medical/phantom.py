"""Synthetic abdominal CT phantoms, so ``foundation pretrain --domain medical`` works before a user has data.

Each phantom is a body ellipse of soft tissue in air with a liver, two kidneys, a spleen and a vertebral
column at their usual HU values, plus noise, and its label map. They are stored the way CT often arrives
converted from DICOM (LPS voxel order, anisotropic 1.2 x 1.2 x 2.5 mm voxels, int16 HU), so the reader's
reorientation and resampling are exercised on every run. Written deterministically, atomically, once.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from foundation.data.samples import write_sample_folder

SHAPE = (96, 96, 64)
SPACING = (1.2, 1.2, 2.5)
LABELS = {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4, "vertebra": 5}
# (label, HU, centre x/y/z, radii x/y/z) in body-relative units, RAS: +x is the patient's right.
ORGANS = (
    ("liver", 60, (0.35, 0.1, 0.2), (0.35, 0.35, 0.45)),
    ("spleen", 45, (-0.45, -0.05, 0.3), (0.15, 0.2, 0.25)),
    ("kidney_right", 30, (0.3, -0.4, -0.25), (0.12, 0.14, 0.3)),
    ("kidney_left", 30, (-0.3, -0.4, -0.2), (0.12, 0.14, 0.3)),
)


def phantom_affine() -> np.ndarray:
    """LPS-ordered voxels (i runs to the patient's left, j to posterior) centred on the world origin."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2)
    return affine


def make_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu int16, labels uint8, affine)`` of one phantom; organs jitter in place and size with ``seed``."""
    rng = np.random.default_rng(seed)
    affine = phantom_affine()
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    half = np.array(SHAPE) * np.array(SPACING) / 2
    x, y, z = ((ijk @ affine[:3, :3].T + affine[:3, 3]) / half).T  # world mm scaled to about [-1, 1]
    body = (x / rng.uniform(0.8, 0.92)) ** 2 + (y / rng.uniform(0.6, 0.72)) ** 2 < 1
    hu = np.where(body, rng.uniform(0, 40), -1000.0)
    labels = np.zeros(x.shape, np.uint8)
    for name, value, centre, radii in ORGANS:
        c = np.array(centre) + rng.normal(0, 0.03, 3)
        r = np.array(radii) * rng.uniform(0.9, 1.1)
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1
        inside &= body
        hu = np.where(inside, value, hu)
        labels[inside] = LABELS[name]
    spine = (x**2 + ((y + 0.5) / 0.9) ** 2 < 0.12**2) & body
    hu = np.where(spine, 700.0, hu)
    labels[spine] = LABELS["vertebra"]
    hu = hu + rng.normal(0, 12, hu.shape)
    return hu.reshape(SHAPE).round().astype(np.int16), labels.reshape(SHAPE), affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner coordinates, as converters write them
    img.set_sform(affine, code=1)
    nib.save(img, path)


def make_sample_volumes(root: Path, count: int = 4, seed: int = 0) -> Path:
    """Write ``root/imagesTr``, ``root/labelsTr`` and a Decathlon ``dataset.json`` once; return ``root``."""

    def fill(tmp: Path) -> None:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for i in range(count):
            hu, labels, affine = make_phantom(seed + i)
            name = f"phantom_{i:03d}.nii.gz"
            _save(hu, affine, tmp / "imagesTr" / name)
            _save(labels, affine, tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        meta = {
            "name": "AbdomenPhantom",
            "description": "synthetic abdominal CT phantoms made by foundation's medical domain",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(v): k for k, v in LABELS.items()},
            "numTraining": count,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))

    return write_sample_folder(root, fill)
