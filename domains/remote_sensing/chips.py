"""Labelled raster chips for kNN / linear probe / embed: ``ROOT/<class>/<chip>.tif`` (ImageFolder layout).

Each chip is read as its centred square (the part a shorter-side resize + centre crop keeps), invalid pixels
filled with the band mean, scaled like the training windows and resized to the evaluation size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from foundation.data.views import EvalView
from foundation.errors import DataError
from foundation_domains.remote_sensing.raster import (
    RasterInfo,
    open_raster,
    read_error_text,
    read_window,
    scan_rasters,
)


def chip_labels(root: str | Path, files: Sequence[Path]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Class names (first sub-folder; '' for chips at the root) and each file's label."""
    root = Path(root)
    names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, tuple(index[n] for n in names)


def scan_chips(root: str | Path, bands: Sequence[int] | None) -> list[RasterInfo]:
    """Every chip under ``root`` (same band count required).

    Raises:
        DataError: ``root`` is not a folder, holds no rasters, or chips disagree on their bands.
    """
    if not Path(root).is_dir():
        raise DataError(f"evaluation data {str(root)!r} must be a folder of class sub-folders of rasters")
    return scan_rasters(root, bands)


class RasterChipDataset:
    """``dataset[i] -> {"image": C x size x size float32 tensor, "label", "id"}``, deterministic."""

    def __init__(
        self,
        root: str | Path,
        infos: Sequence[RasterInfo],
        scales: Sequence[float],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        nodata: float | None = None,
    ) -> None:
        self.infos = list(infos)
        self.scales = list(scales)
        self.classes, self.labels = chip_labels(root, [Path(i.path) for i in self.infos])
        self.fill = np.asarray(mean, dtype=np.float32)
        self.nodata = nodata
        self.view = EvalView(size, mean, std, max_pixel_value=1.0)

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.infos[index]
        side = min(info.width, info.height)
        win = Window((info.width - side) // 2, (info.height - side) // 2, side, side)
        try:
            with open_raster(info.path) as ds:
                image, valid = read_window(ds, info.bands, win, self.nodata)
        except RasterioError as e:  # opens, then fails mid-read (e.g. a truncated GeoTIFF)
            raise DataError(f"{info.path}: read error: {read_error_text(e)}") from e
        image = image / np.float32(self.scales[index])
        image[~valid] = self.fill
        return {"image": self.view(image), "label": self.labels[index], "id": info.path}
