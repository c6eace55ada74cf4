"""``foundation visualize`` inputs of the ``pathology`` domain: a slide region at a chosen resolution, the
tissue tiles of a slide, or the tiles of an ``embed`` feature file (read back from its slide at the file's
own resolution and tile size, so the picture shows the tiles those features came from)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from foundation.errors import ConfigError, DataError
from foundation.visualize.inputs import VisualInput, VisualRequest
from foundation_domains.pathology.slide import Slide, open_slide
from foundation_domains.pathology.tissue import Tiling, mask_for_tiles, plan_tiles, read_tile

DEFAULT_MPP = 0.5
MAX_REGION_SIDE = 2048  # px at the chosen mpp; beyond this the attention matrix outgrows a laptop


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``: tiles from the whole slide, not its first rows."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k)).round()})


def read_region_at(slide: Slide, region: tuple[int, int, int, int], mpp: float) -> np.ndarray:
    """The level-0 ``x, y, w, h`` region of ``slide`` resampled to ``mpp`` um/px.

    Raises:
        DataError: the region leaves the slide or is too large at this resolution.
    """
    x, y, w, h = region
    w0, h0 = slide.dimensions
    if x < 0 or y < 0 or x + w > w0 or y + h > h0:
        raise DataError(f"{slide.path}: region {region} is outside the slide ({w0} x {h0} level-0 px)")
    out_w, out_h = (max(1, round(s * slide.mpp / mpp)) for s in (w, h))
    if max(out_w, out_h) > MAX_REGION_SIDE:
        raise DataError(
            f"{slide.path}: region {region} is {out_w} x {out_h} px at {mpp} um/px (at most {MAX_REGION_SIDE}); "
            "give a smaller --region or a coarser --mpp"
        )
    level = slide.best_level(mpp)
    ds = slide.level_downsamples[level]
    size = (max(1, round(w / ds)), max(1, round(h / ds)))
    pixels = slide.read_region((x, y), level, size)
    if pixels.shape[:2] != (out_h, out_w):
        shrink = pixels.shape[1] > out_w
        pixels = cv2.resize(
            pixels, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
        )
    return pixels


def _feature_file_tiles(path: Path, request: VisualRequest, mean, std) -> Iterator[VisualInput]:
    """Tiles of an ``embed`` HDF5: its ``coords`` and the tiling attributes stored with them."""
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"])
            attrs = dict(f.attrs)
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: not a feature file of `foundation embed --domain pathology` ({e})") from e
    missing = [k for k in ("slide", "mpp", "tile_size", "level", "read_size", "extent") if k not in attrs]
    if missing:
        raise DataError(
            f"{path}: feature file without {missing}; re-run `foundation embed --domain pathology`"
        )
    slide_path = Path(str(attrs["slide"]))
    override = float(attrs["slide_mpp"]) if attrs.get("mpp_source") == "override" else None
    tiling = Tiling(
        coords=coords,
        tissue=np.ones(len(coords), np.float32),
        mpp=float(attrs["mpp"]),
        tile_size=int(attrs["tile_size"]),
        level=int(attrs["level"]),
        read_size=int(attrs["read_size"]),
        extent=int(attrs["extent"]),
    )
    if not slide_path.exists():
        raise DataError(f"{path}: its slide {str(slide_path)!r} is not there any more")
    with open_slide(slide_path, override) as slide:
        for i in _spread(len(tiling), request.max_tiles):
            x, y = (int(v) for v in coords[i])
            yield VisualInput(
                name=f"{path.stem}_tile{i}",
                title=f"{path.name} tile {i} ({slide_path.name} x={x} y={y}, {tiling.mpp} um/px)",
                pixels=_chw(read_tile(slide, tiling, i)),
                mean=mean,
                std=std,
            )


def _slide_inputs(
    path: Path, request: VisualRequest, mean, std, slide_mpp: float | None = None
) -> Iterator[VisualInput]:
    """A region of the slide (``--region``), else its tissue tiles at ``request.size`` px; ``slide_mpp``
    overrides the file's resolution."""
    mpp = request.mpp or DEFAULT_MPP
    with open_slide(path, slide_mpp) as slide:
        if request.region is not None:
            x, y, w, h = request.region
            yield VisualInput(
                name=f"{path.stem}_x{x}_y{y}_{w}x{h}",
                title=f"{path.name} region x={x} y={y} {w}x{h} (level 0) at {mpp} um/px",
                pixels=_chw(read_region_at(slide, request.region, mpp)),
                mean=mean,
                std=std,
            )
            return
        tiling = plan_tiles(slide, mask_for_tiles(slide, mpp, request.size), mpp, request.size)
        if len(tiling) == 0:
            raise DataError(f"{path}: no tissue tile of {request.size} px at {mpp} um/px; give --region")
        for i in _spread(len(tiling), request.max_tiles):
            x, y = (int(v) for v in tiling.coords[i])
            yield VisualInput(
                name=f"{path.stem}_x{x}_y{y}",
                title=f"{path.name} tile x={x} y={y} at {mpp} um/px",
                pixels=_chw(read_tile(slide, tiling, i)),
                mean=mean,
                std=std,
            )


def visual_inputs(
    request: VisualRequest, mean: tuple[float, ...], std: tuple[float, ...]
) -> Iterator[VisualInput]:
    """Slides (a ``--region`` of each, else tissue tiles) and ``.h5`` feature files (their tiles)."""
    request.refuse("pathology", "bands", "rgb", options=("slide_mpp",))
    slide_mpp = request.options.get("slide_mpp")
    if slide_mpp is not None and (not isinstance(slide_mpp, (int, float)) or slide_mpp <= 0):
        raise ConfigError(f"--option slide_mpp={slide_mpp!r} must be a number > 0 (microns per pixel)")
    for given in request.inputs:
        path = Path(given)
        if not path.exists():
            raise DataError(f"{path}: does not exist")
        if path.suffix.lower() in (".h5", ".hdf5"):
            yield from _feature_file_tiles(path, request, mean, std)
        else:
            yield from _slide_inputs(path, request, mean, std, slide_mpp)
