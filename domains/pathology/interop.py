"""What CLAM and TRIDENT read from a feature file, written by ``embed`` so their code opens ours unchanged.

Both tools read attributes of the ``coords`` dataset, and they disagree on one name:

- CLAM (``Whole_Slide_Bag_FP``, ``StitchCoords``) passes ``patch_level`` and ``patch_size`` to
  ``read_region(coord, patch_level, (patch_size, patch_size))``: ``patch_size`` is the side in pixels AT
  ``patch_level``. Its level-0 side is ``patch_size * level_downsamples[patch_level]``.
- TRIDENT (``IO.coords_to_h5``, ``WSI.create_patcher``) takes ``patch_size`` as the side at
  ``target_magnification``, and its slide encoders and heatmaps read ``patch_size_level0``, the side in level-0
  pixels (``patch_size * level0_magnification // target_magnification`` in its own files).

We write ``patch_size`` and ``patch_level`` with CLAM's meaning (the level we read and the side read there:
CLAM has no other attribute to find the tile's region) and ``patch_size_level0``, ``level0_magnification`` and
``target_magnification`` with TRIDENT's (what its slide encoders use). The side at the target resolution, which
is TRIDENT's ``patch_size``, is our ``tile_size``; the two ``patch_size`` meanings agree only when the level read
is at the target resolution. Magnification is ``10 / mpp`` (0.25 um/px = 40x), the usual convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from foundation.errors import OutputError
from foundation.outputs import write_verified
from foundation_domains.pathology.tissue import Tiling

MICRONS_AT_1X = 10.0  # um/px at magnification 1: magnification = 10 / mpp
BAG_FORMATS = ("pt",)
BAG_FOLDER = {"pt": "pt_files"}
# root attributes of our files that are repeated on `coords` (the backbone and normalisation next to the tiling)
_REPEATED = ("backbone", "backbone_fingerprint", "pooling", "mean", "std", "mpp_source")


def magnification(mpp: float) -> float:
    """Objective magnification of a resolution: ``10 / mpp`` (0.25 um/px = 40x, 0.5 um/px = 20x)."""
    return MICRONS_AT_1X / float(mpp)


def coords_attributes(
    *, name: str, tiling: Tiling, slide_mpp: float, level0_size: tuple[int, int], root_attrs: dict[str, Any]
) -> dict[str, Any]:
    """The ``coords`` attributes CLAM and TRIDENT read (see the module docstring for whose meaning each has),
    plus our resolution, backbone and normalisation."""
    width, height = (int(v) for v in level0_size)
    return {
        "patch_size": int(tiling.read_size),  # CLAM: side at patch_level
        "patch_level": int(tiling.level),  # CLAM and TRIDENT's legacy reader
        "patch_size_level0": int(tiling.extent),  # TRIDENT: side in level-0 pixels
        "level0_magnification": magnification(slide_mpp),  # TRIDENT
        "target_magnification": magnification(tiling.mpp),  # TRIDENT
        "overlap": int(tiling.overlap),  # TRIDENT: pixels at the target resolution shared by neighbours
        "name": name,  # both: the slide's name (our file's stem)
        "level0_width": width,  # TRIDENT
        "level0_height": height,
        "mpp": float(tiling.mpp),  # ours: target microns per pixel of a tile
        "slide_mpp": float(slide_mpp),
        "tile_size": int(tiling.tile_size),  # ours: tile side at mpp (TRIDENT's meaning of patch_size)
        **{k: root_attrs[k] for k in _REPEATED if k in root_attrs},
    }


def bag_path(feature_file: Path, fmt: str) -> Path:
    """``FEATS/pt_files/<slide>.pt`` beside ``FEATS/<slide>.h5`` (CLAM's ``pt_files`` folder)."""
    return feature_file.parent / BAG_FOLDER[fmt] / f"{feature_file.stem}.{fmt}"


def write_pt_bag(path: Path, features: np.ndarray) -> Path:
    """``torch.save`` of the N x D float32 tensor alone (what CLAM's ``torch.load`` expects), atomically and read
    back with ``weights_only=True`` before the rename.

    Raises:
        OutputError: the folder or file cannot be written; nothing is left under ``path``'s name.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))

    def verify(tmp: Path) -> None:
        back = torch.load(tmp, weights_only=True)
        if not (isinstance(back, torch.Tensor) and back.dtype == torch.float32 and torch.equal(back, tensor)):
            raise OutputError(f"{path}: read back differs from what was written")

    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path.parent}: cannot create ({e.strerror or e})") from e
    return write_verified(path, lambda tmp: torch.save(tensor, tmp), verify)


def bag_matches(path: Path, features: np.ndarray) -> bool:
    """``path`` is a bag holding exactly ``features`` (a complete slide's bag needs no rewrite)."""
    try:
        back = torch.load(path, weights_only=True)
    except Exception:  # missing, truncated, not a tensor file: it does not match
        return False
    return (
        isinstance(back, torch.Tensor)
        and back.shape == features.shape
        and torch.equal(back, torch.from_numpy(features))
    )


def ensure_pt_bag(feature_file: Path) -> bool:
    """Write the ``pt`` bag of a complete feature file when it is missing or differs; returns whether it wrote.

    Raises:
        OutputError: as :func:`write_pt_bag`.
    """
    with h5py.File(feature_file, "r") as f:
        features = f["features"][()]
    path = bag_path(feature_file, "pt")
    if bag_matches(path, features):
        return False
    write_pt_bag(path, features)
    return True
