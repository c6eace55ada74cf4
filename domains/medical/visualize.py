"""``foundation visualize`` inputs of the ``medical`` domain: volumes read as for training (RAS, target
spacing, intensity preset), shown as axial, coronal and sagittal planes in radiological orientation.

A 2D (slice) backbone gets the three middle slices as three inputs; a 3D backbone gets the centred
``size^3`` cube it would be trained on (padded with background), and its maps are shown on the same planes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from foundation.visualize.inputs import PlaneView, VisualInput, VisualRequest, fit_to_patches
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.volume import BACKGROUND, find_volumes, load_volume

# RAS array axes (X, Y, Z): a slice across one, transposed and flipped on both axes, puts anterior or
# superior at the top and the patient's right on the viewer's left.
PLANES = (
    PlaneView(axis=2, label="axial", transpose=True, flip=True),
    PlaneView(axis=1, label="coronal", transpose=True, flip=True),
    PlaneView(axis=0, label="sagittal", transpose=True, flip=True),
)


def middle_slice(array: torch.Tensor, view: PlaneView) -> torch.Tensor:
    """``C x X x Y x Z`` -> the middle ``C x H x W`` slice across ``view.axis``, oriented for display."""
    dim = 1 + view.axis
    out = array.select(dim, array.shape[dim] // 2)
    if view.transpose:
        out = out.transpose(-1, -2)
    return out.flip(-1, -2) if view.flip else out


def centre_cube(array: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``C x size^3`` part of ``array``, padded with background where the volume is smaller."""
    pads, crops = [], []
    for s in array.shape[1:]:
        start = max(0, (s - size) // 2)
        crops.append(slice(start, start + min(s, size)))
        short = max(0, size - s)
        pads.append((short // 2, short - short // 2))
    cube = array[(slice(None), *crops)]
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last dimension first
    return F.pad(cube, flat, value=BACKGROUND)


def visual_inputs(request: VisualRequest) -> Iterator[VisualInput]:
    """Volumes (NIfTI files, DICOM series folders, or folders of them)."""
    request.refuse(
        "medical", "region", "mpp", "bands", "rgb", options=("modality", "spacing", "window", "channels")
    )
    opts = VolumeOptions.from_options(request.options)
    for given in request.inputs:
        for path in find_volumes(given):
            array = load_volume(path, opts).array  # C x X x Y x Z in [0, 1]
            stem = Path(path).name.split(".")[0]
            zeros, ones = (0.0,) * array.shape[0], (1.0,) * array.shape[0]
            if request.spatial_dims == 3:
                yield VisualInput(
                    name=stem,
                    title=f"{path} (centre {request.size}^3 voxels at {opts.spacing} mm)",
                    pixels=centre_cube(array, request.size),
                    mean=zeros,
                    std=ones,
                    display=(0,),
                    planes=PLANES,
                )
                continue
            for view in PLANES:
                image = fit_to_patches(middle_slice(array, view), request.size, request.patch_size)
                yield VisualInput(
                    name=f"{stem}_{view.label}",
                    title=f"{path} {view.label} middle slice",
                    pixels=image,
                    mean=zeros,
                    std=ones,
                    display=(0,),
                )
