"""2D slices of volumes for DINOv2 (and 2D MAE) pretraining, as in DINOv2-for-radiology (arXiv 2312.02366).

Volumes are read exactly as for 3D (RAS, target spacing, intensity preset to [0, 1]); a sample is one axial
slice (the RAS volume's last axis) as an ``H x W x C`` float32 image, which the shared 2D view pipelines
(multi-crop or MAE) crop and flip like any other image. Slices that are mostly air are redrawn, so crops show
anatomy rather than the scanner's field of view.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from domains.medical.source import VolumeSampleSource

FOREGROUND_LEVEL = 0.05  # after the preset: above the bottom of the CT window / MR percentile range
MIN_FOREGROUND = 0.1  # fraction of the slice that must be foreground (else another slice is drawn)
SLICE_TRIES = 8


class SliceSampleSource(VolumeSampleSource):
    """``sample(i, g)``: a random volume, a random axial slice with anatomy: ``{"image": H x W x C float32}``."""

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        array = self.random_volume(generator).array  # C x X x Y x Z, RAS
        for _ in range(SLICE_TRIES):
            z = int(torch.randint(0, array.shape[-1], (1,), generator=generator))
            image = array[..., z]
            if float((image > FOREGROUND_LEVEL).float().mean()) >= MIN_FOREGROUND:
                break
        # radiological display: anterior at the top, the patient's right on the viewer's left
        pixels = image.flip(-1, -2).permute(2, 1, 0)  # C x X x Y -> H (A->P) x W (R->L) x C
        return {"image": np.ascontiguousarray(pixels.numpy(), dtype=np.float32)}
