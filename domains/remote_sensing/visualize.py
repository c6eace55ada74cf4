"""``foundation visualize`` inputs of the ``remote_sensing`` domain: a pixel window of each raster, the
selected bands fed to the model, a colour composite of chosen bands shown next to the maps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window

from foundation.errors import ConfigError, DataError
from foundation.visualize.inputs import VisualInput, VisualRequest
from foundation_domains.remote_sensing.raster import (
    RasterInfo,
    inspect_raster,
    list_rasters,
    open_raster,
    read_pixels,
    value_scale,
)

MAX_WINDOW_SIDE = 2048


def _window(info: RasterInfo, request: VisualRequest) -> tuple[int, int, int, int]:
    """``--region col,row,w,h`` checked against the raster, else a centred ``size`` window (the whole raster
    when smaller).

    Raises:
        DataError: a window outside the raster or too large.
    """
    if request.region is None:
        w, h = min(request.size, info.width), min(request.size, info.height)
        return (info.width - w) // 2, (info.height - h) // 2, w, h
    x, y, w, h = request.region
    if x < 0 or y < 0 or x + w > info.width or y + h > info.height:
        raise DataError(
            f"{info.path}: --region {request.region} is outside the raster ({info.width} x {info.height})"
        )
    if max(w, h) > MAX_WINDOW_SIDE:
        raise DataError(
            f"{info.path}: --region {request.region} is larger than {MAX_WINDOW_SIDE} px; give a smaller one"
        )
    return x, y, w, h


def composite(info: RasterInfo, rgb: tuple[int, int, int] | None) -> tuple[int, ...]:
    """Indices (into the selected bands) of the bands shown: ``--rgb``, else the file's red/green/blue bands,
    else the first three (one band: grey).

    Raises:
        ConfigError: an ``--rgb`` band that is not among the bands fed to the model.
    """
    if rgb is not None:
        missing = [b for b in rgb if b not in info.bands]
        if missing:
            raise ConfigError(
                f"--rgb {list(rgb)}: band(s) {missing} are not among the bands read {list(info.bands)}"
            )
        return tuple(info.bands.index(b) for b in rgb)
    named = [info.colorinterp.index(c) for c in ("red", "green", "blue") if c in info.colorinterp]
    if len(named) == 3:
        return tuple(named)
    return (0, 1, 2) if info.channels >= 3 else (0,)


def read_scene_window(
    info: RasterInfo,
    window: tuple[int, int, int, int],
    *,
    scale: object = "auto",
    nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``C x H x W`` float32 in the domain's units (pixel / scale: ``auto`` by dtype, or a number) with missing
    pixels (nodata, also ``nodata`` for files that declare none; NaN) set to their band's mean (as
    ``canopy-height`` feeds them), and the valid mask.

    Raises:
        DataError: no valid pixel in the window.
    """
    x, y, w, h = window
    with open_raster(info.path) as ds:
        px = read_pixels(ds, info.bands, Window(x, y, w, h), nodata=nodata)
    values = px.values / value_scale(info, scale)
    if not px.valid.any():
        raise DataError(f"{info.path}: window {window} holds no valid pixel (all nodata or NaN)")
    means = values[px.valid].mean(axis=0)
    values = np.where(px.valid[..., None], values, means)
    return np.ascontiguousarray(values.transpose(2, 0, 1), dtype=np.float32), px.valid


def visual_inputs(request: VisualRequest) -> Iterator[VisualInput]:
    """One window per raster (files, or folders of them)."""
    request.refuse("remote_sensing", "mpp", options=("scale", "nodata"))
    scale = request.options.get("scale", "auto")
    nodata = request.options.get("nodata")
    paths = [
        p
        for given in request.inputs
        for p in (list_rasters(given) if Path(given).is_dir() else [Path(given)])
    ]
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"{path}: does not exist")
        info = inspect_raster(path, request.bands)
        window = _window(info, request)
        pixels, valid = read_scene_window(info, window, scale=scale, nodata=nodata)
        flat = pixels[:, valid]
        x, y, w, h = window
        bands = ",".join(str(b) for b in info.bands)
        yield VisualInput(
            name=f"{Path(path).stem}_x{x}_y{y}_{w}x{h}",
            title=f"{path} window x={x} y={y} {w}x{h}, bands {bands}",
            pixels=torch.from_numpy(pixels),
            mean=tuple(float(m) for m in flat.mean(axis=1)),  # this window's own, when the backbone has none
            std=tuple(max(float(s), 1e-6) for s in flat.std(axis=1)),
            display=composite(info, request.rgb),
            stretch=True,
        )
