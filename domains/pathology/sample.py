"""A synthetic H&E slide made on the spot, so ``foundation pretrain --domain pathology`` works without data.

An Aperio-style pyramidal TIFF (JPEG tiles, ``MPP = 0.25`` in the description, reduced levels as top-level
pages so OpenSlide reads every level): white glass with a few irregular tissue pieces whose colours come
from haematoxylin/eosin densities (pink fibrous stroma, purple nuclei, a few empty lumens).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import tifffile

from foundation_domains.pathology.stain import hed_to_rgb

SAMPLE_NAME = "sample_slide.svs"
SAMPLE_MPP = 0.25


def _tissue_layout(rng: np.random.Generator, h: int, w: int, pieces: int) -> np.ndarray:
    """Low-resolution float mask of irregular blobs (Gaussian bumps warped by smooth noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for _ in range(pieces):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.15, 0.85) * w
        sy, sx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.06, 0.14) * w
        field += np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), max(h, w) / 40)
    return field + 0.35 * noise / (noise.std() + 1e-6) - 0.45


def synthetic_he(width: int = 4096, height: int = 3072, seed: int = 0, pieces: int = 5) -> np.ndarray:
    """``height x width x 3`` uint8 H&E-like image; about a third of it is tissue."""
    rng = np.random.default_rng(seed)
    low = _tissue_layout(rng, height // 16, width // 16, pieces)
    tissue = (cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC) > 0).astype(np.uint8)
    for _ in range(12):  # empty lumens
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        axes = (int(rng.integers(30, 90)), int(rng.integers(20, 60)))
        cv2.ellipse(tissue, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)
    hed = np.zeros((height, width, 3), np.float32)
    # Eosin: stroma with fibres (noise stretched along one axis) and slow intensity changes.
    fibres = rng.standard_normal((height // 2, width // 2), dtype=np.float32)
    fibres = cv2.GaussianBlur(fibres, (0, 0), sigmaX=6, sigmaY=1)
    fibres = cv2.resize(fibres * (0.12 / (fibres.std() + 1e-6)), (width, height))
    slow = rng.standard_normal((48, 64), dtype=np.float32)
    slow = cv2.resize(cv2.GaussianBlur(slow, (0, 0), 4) * 0.6, (width, height))
    hed[..., 1] = np.clip(fibres + slow + 0.55, 0.15, 1.2) * tissue
    # Haematoxylin: light background staining plus nuclei (ellipses 5-9 um across at 0.25 um/px).
    haem = tissue.astype(np.float32) * 0.05
    ys, xs = rng.integers(0, height, 9000), rng.integers(0, width, 9000)
    for y, x in zip(ys, xs, strict=True):
        if tissue[y, x]:
            axes = (int(rng.integers(9, 18)), int(rng.integers(7, 13)))
            angle, density = float(rng.uniform(0, 180)), float(rng.uniform(0.9, 1.6))
            cv2.ellipse(haem, (int(x), int(y)), axes, angle, 0, 360, density, -1)
    hed[..., 0] = cv2.GaussianBlur(haem, (0, 0), 1.2)
    hed[..., :2] += rng.standard_normal((height, width, 1), dtype=np.float32) * 0.03
    hed += 0.02  # glass is slightly off-white, as scanned
    return hed_to_rgb(np.maximum(hed, 0, out=hed))


def write_pyramid_tiff(path: Path, image: np.ndarray, description: str, downsamples=(4, 16)) -> None:
    """Tiled JPEG pyramid; reduced levels are top-level pages (``subfiletype=1``), as OpenSlide expects."""
    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        opts = {
            "tile": (256, 256),
            "compression": "jpeg",
            "compressionargs": {"level": 90},
            "photometric": "rgb",
            "metadata": None,
        }
        tif.write(image, description=description, **opts)
        for ds in downsamples:
            level = cv2.resize(image, (max(1, w // ds), max(1, h // ds)), interpolation=cv2.INTER_AREA)
            tif.write(level, subfiletype=1, **opts)


def make_sample_slide(root: Path, seed: int = 0) -> Path:
    """Write ``root/sample_slide.svs`` once (atomically: temporary name, then rename) and return ``root``."""
    root = Path(root)
    path = root / SAMPLE_NAME
    if path.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    image = synthetic_he(seed=seed)
    h, w = image.shape[:2]
    description = (
        f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
        f"|AppMag = 40|MPP = {SAMPLE_MPP}|Title = foundation synthetic H&E sample"
    )
    tmp = root / f".{SAMPLE_NAME}.tmp{os.getpid()}"
    try:
        write_pyramid_tiff(tmp, image, description)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return root
