"""2D slices of volumes for DINOv2 (and 2D MAE) pretraining, as in DINOv2-for-radiology (arXiv 2312.02366).

Volumes are read exactly as for 3D (RAS, target spacing, intensity preset to [0, 1]); a sample is one axial
slice (the RAS volume's last axis) as an ``H x W x C`` float32 image, which the shared 2D view pipelines
(multi-crop or MAE) crop and flip like any other image. Slices that are mostly air are redrawn, so crops show
anatomy rather than the scanner's field of view.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundation.data.views import EvalView
from foundation.errors import DataError
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.source import VolumeSampleSource
from foundation_domains.medical.volume import find_volumes, load_volume

FOREGROUND_LEVEL = 0.05  # after the preset: above the bottom of the CT window / MR percentile range
MIN_FOREGROUND = 0.1  # fraction of the slice that must be foreground (else another slice is drawn)
SLICE_TRIES = 8
STATS_SLICES = 16  # slices drawn (as training draws them) to estimate the 2D views' mean and std
STATS_SEED = 0x5715  # their own generator: the training stream is untouched


class SliceSampleSource(VolumeSampleSource):
    """``sample(i, g)``: a random volume, a random axial slice with anatomy: ``{"image": H x W x C float32}``."""

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        array = self.random_volume(generator).array  # C x X x Y x Z, RAS
        for _ in range(SLICE_TRIES):
            z = int(torch.randint(0, array.shape[-1], (1,), generator=generator))
            image = array[..., z]
            if float((image > FOREGROUND_LEVEL).float().mean()) >= MIN_FOREGROUND:
                break
        return {"image": display_slice(image)}


def slice_statistics(
    source: SliceSampleSource, seed: int, n: int = STATS_SLICES
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``n`` slices drawn as pretraining draws them.

    Why: windowed slices sit in [0, 1] with a small spread (std ~0.1-0.3); fed as they are, a random ViT gives
    every slice nearly the same CLS feature (mean pairwise cosine 0.99 measured on grey slices, 0.93 once
    standardised), so a DINOv2 teacher starts on uniform targets. Standardising with the data's own statistics
    (as torchgeo does per band) gives the objective image-dependent targets from the first step.
    """
    generator = torch.Generator().manual_seed(seed ^ STATS_SEED)
    images = [source.sample(i, generator)["image"] for i in range(n)]
    pixels = np.concatenate([x.reshape(-1, x.shape[-1]) for x in images]).astype(np.float64)
    mean, std = pixels.mean(0), np.maximum(pixels.std(0), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def display_slice(image: torch.Tensor) -> np.ndarray:
    """An axial ``C x X x Y`` RAS slice as ``H x W x C`` float32 in radiological display (anterior at the top,
    the patient's right on the viewer's left), so pretraining and evaluation see slices the same way."""
    pixels = image.flip(-1, -2).permute(2, 1, 0)  # C x X x Y -> H (A->P) x W (R->L) x C
    return np.ascontiguousarray(pixels.numpy(), dtype=np.float32)


class LabelledSliceDataset:
    """``ROOT/<class>/<volume>.nii.gz``: every axial slice of a volume is one item of its folder's class, read
    as pretraining reads it (RAS, ``spacing``, intensity preset), for kNN and linear probes of slice backbones.
    ``mean``/``std`` are the backbone's (the slices' own statistics, see :func:`slice_statistics`).

    Volumes are preprocessed once and their slices kept in memory: meant for labelled sets of slices, not for
    a whole archive of CTs. ``dataset[i] -> {"image": C x size x size, "label", "id": "FILE:z"}``.

    Raises:
        DataError: ``root`` is not a folder of class sub-folders of volumes, or a volume is unusable.
    """

    def __init__(
        self, root: str | Path, opts: VolumeOptions, size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        root = Path(root)
        files = find_volumes(root) if root.is_dir() else []
        names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
        if not files or "" in names:
            raise DataError(f"{root}: expected class sub-folders of volumes (ROOT/<class>/<volume>.nii.gz)")
        self.classes = sorted(set(names))
        self.items: list[tuple[np.ndarray, int, str]] = []
        for path, name in zip(files, names, strict=True):
            array = load_volume(path, opts).array  # C x X x Y x Z
            label = self.classes.index(name)
            self.items += [
                (display_slice(array[..., z]), label, f"{path}:{z}") for z in range(array.shape[-1])
            ]
        self.view = EvalView(size, mean, std, max_pixel_value=1.0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label, name = self.items[index]
        return {"image": self.view(image), "label": label, "id": name}
