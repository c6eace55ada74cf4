"""Small real slides written with tifffile: Aperio-like SVS, generic pyramid, OME-TIFF, plain and broken files.

The tissue layout is known: one textured pink/purple rectangle on white glass, so tests can say exactly
where tiles must and must not be.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

# Level-0 size and the tissue rectangle (x0, y0, x1, y1) in level-0 pixels.
WIDTH, HEIGHT = 2048, 1536
TISSUE = (512, 512, 1536, 1024)


def tissue_image(width: int = WIDTH, height: int = HEIGHT, box=TISSUE, seed: int = 0) -> np.ndarray:
    """White glass with one H&E-coloured rectangle (pink stroma, purple speckles)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    x0, y0, x1, y1 = box
    patch = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    patch[:] = (225, 140, 185)
    nuclei = rng.random(patch.shape[:2]) < 0.05
    patch[nuclei] = (90, 60, 150)
    img[y0:y1, x0:x1] = patch
    return img


def pyramid(image: np.ndarray, downsamples=(2, 4)) -> list[np.ndarray]:
    h, w = image.shape[:2]
    return [image] + [cv2.resize(image, (w // d, h // d), interpolation=cv2.INTER_AREA) for d in downsamples]


def write_levels(
    path: Path, levels: list[np.ndarray], *, compression="zlib", first: dict | None = None
) -> Path:
    """Tiled pyramid with reduced levels as top-level pages (what OpenSlide reads)."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            extra = dict(first or {}) if i == 0 else {"subfiletype": 1}
            tif.write(
                level, tile=(256, 256), compression=compression, photometric="rgb", metadata=None, **extra
            )
    return path


def write_svs(path: Path, mpp: float | None = 0.25, appmag: int = 40, image=None) -> Path:
    """Aperio-like: the first ImageDescription starts with 'Aperio' and carries '|MPP = ...'."""
    image = tissue_image() if image is None else image
    h, w = image.shape[:2]
    desc = f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = {appmag}"
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    return write_levels(path, pyramid(image), compression="jpeg", first={"description": desc})


def write_generic(path: Path, mpp: float = 0.5, unit: str = "CENTIMETER") -> Path:
    per_unit = (1e4 if unit == "CENTIMETER" else 25400.0) / mpp
    first = {"resolution": (per_unit, per_unit), "resolutionunit": unit}
    return write_levels(path, pyramid(tissue_image()), first=first)


def write_ome(path: Path, mpp: float = 0.25) -> Path:
    """OME-TIFF whose reduced levels are SubIFDs (OpenSlide sees one level and no resolution)."""
    levels = pyramid(tissue_image())
    meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        opts = {"tile": (256, 256), "compression": "zlib", "photometric": "rgb"}
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta, **opts)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, metadata=None, **opts)
    return path


@pytest.fixture
def svs(tmp_path: Path) -> Path:
    return write_svs(tmp_path / "aperio.svs")


@pytest.fixture
def generic_tiff(tmp_path: Path) -> Path:
    return write_generic(tmp_path / "generic.tif")


@pytest.fixture
def ome_tiff(tmp_path: Path) -> Path:
    return write_ome(tmp_path / "slide.ome.tif")
