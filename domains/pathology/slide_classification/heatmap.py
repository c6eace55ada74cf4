"""Heatmaps: where on the slide the model looked (or what it saw there), one PNG per slide with a colour bar.

Attention is turned into its percentile within the slide (CLAM's ``convert_to_percentiles``: bags of 10 and
10,000 tiles read on one scale); class probabilities are drawn as they are (0 to 1). Each tile's score is painted
over its level-0 square (``coords`` and ``patch_size_level0``; where tiles overlap, the mean of their scores), on
the slide's thumbnail when the slide can be opened, else on white, with the colour bar and its label on the
right (matplotlib's Agg canvas, no pyplot). PNGs carry a text mark; only marked files are replaced.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from foundation.errors import DataError, OutputError
from foundation.outputs import write_verified

MARK = ("foundation", "slide-heatmap")
MAX_SIDE = 1024  # thumbnail's longer side in pixels
BAR_WIDTH = 120  # pixels of the colour bar and its labels, right of the map
BAR_MIN_HEIGHT = 256  # a very wide slide's map is padded to this height so the bar stays readable
CMAP = "jet"
ATTENTION_LABEL = "attention percentile (within the slide)"


def percentiles(attention: np.ndarray) -> np.ndarray:
    """Each value's rank in [0, 1] (ties share their mean rank, as CLAM's ``rankdata(..., 'average')``; one tile
    is 1)."""
    attention = np.asarray(attention, np.float64)
    if len(attention) == 1:
        return np.ones(1)
    ordered = np.sort(attention)
    first = np.searchsorted(ordered, attention, side="left")
    last = np.searchsorted(ordered, attention, side="right") - 1
    return (first + last) / 2 / (len(attention) - 1)


def tile_geometry(feature_file: Path) -> tuple[np.ndarray, int, tuple[int, int] | None, str | None]:
    """Level-0 corners, tile side (:func:`_tile_side`) and slide size of a feature file (from its ``coords``
    attributes; None when the file does not record it, as CLAM's) and the slide it was made from.

    Raises:
        DataError: the file cannot be read, or its ``coords`` are not ``N x 2`` (N > 0).
    """
    try:
        with h5py.File(feature_file, "r") as f:
            coords = f["coords"][()]
            attrs = dict(f["coords"].attrs)
            slide = f.attrs.get("slide")
            if coords.ndim != 2 or coords.shape[1] != 2 or not len(coords):
                raise ValueError(f"'coords' of shape {coords.shape}, not N x 2")
            side = _tile_side(coords, attrs, dict(f.attrs))
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{feature_file}: cannot read its tiles ({e})") from e
    recorded = "level0_width" in attrs and "level0_height" in attrs
    size = (int(attrs["level0_width"]), int(attrs["level0_height"])) if recorded else None
    return coords, side, size, str(slide) if slide else None


def _tile_side(coords: np.ndarray, attrs: dict, root: dict) -> int:
    """A tile's side in level-0 pixels: ``patch_size_level0`` (ours, TRIDENT's), our ``extent``, CLAM's
    ``patch_size`` at ``patch_level`` (times its ``downsample``), else the grid step of the corners (CLAM's feature
    files carry no attribute; with overlapping tiles the step is shorter than the side), else 256. The step is the
    most common gap between neighbours of a row (or a column): CLAM starts each tissue contour's grid at the
    contour's corner, so corners of two contours are not on one lattice."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "extent" in root:
        return int(root["extent"])
    if "patch_size" in attrs and int(attrs.get("patch_level", -1)) == 0:
        return int(attrs["patch_size"])
    if "patch_size" in attrs and "downsample" in attrs:
        return round(float(attrs["patch_size"]) * float(np.ravel(attrs["downsample"])[0]))
    for along, across in ((0, 1), (1, 0)):
        order = np.lexsort((coords[:, along], coords[:, across]))
        line, place = coords[order, across], coords[order, along]
        gaps = np.diff(place)[(np.diff(line) == 0) & (np.diff(place) > 0)]
        if len(gaps):
            values, counts = np.unique(gaps, return_counts=True)
            return int(values[np.argmax(counts)])
    return 256


def heat_image(
    coords: np.ndarray, scores: np.ndarray, side: int, size: tuple[int, int], background: np.ndarray | None
) -> np.ndarray:
    """``H x W x 3`` uint8: the tiles' scores (0 to 1) in a colour map, half over the background (or white);
    where tiles overlap, the mean of their scores."""
    from matplotlib import colormaps

    width, height = size
    scale = min(1.0, MAX_SIDE / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if background is None or background.shape[:2] != (h, w):
        import cv2

        base = np.full((h, w, 3), 255, np.uint8) if background is None else cv2.resize(background, (w, h))
    else:
        base = background
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for (x, y), score in zip(coords, np.asarray(scores, np.float64), strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int((x + side) * scale)), max(y0 + 1, int((y + side) * scale))
        total[y0:y1, x0:x1] += score
        count[y0:y1, x0:x1] += 1
    painted = count > 0
    out = base.astype(np.float32)
    colours = colormaps[CMAP](total[painted] / count[painted])[:, :3] * 255
    out[painted] = 0.5 * out[painted] + 0.5 * colours
    return out.clip(0, 255).astype(np.uint8)


def colour_bar(height: int, label: str, limits: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """``height x BAR_WIDTH x 3`` uint8: the colour map from ``limits[0]`` (bottom) to ``limits[1]`` (top) with
    ticks and ``label``, drawn by matplotlib on an Agg canvas (no pyplot, no display)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(BAR_WIDTH / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0.12, 0.05, 0.2, 0.9))
    mappable = ScalarMappable(norm=Normalize(*limits), cmap=colormaps[CMAP])
    bar = figure.colorbar(mappable, cax=axes, orientation="vertical")
    bar.ax.tick_params(labelsize=8)
    bar.set_label(label, fontsize=8)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[:height, :BAR_WIDTH, :3])


def with_colour_bar(image: np.ndarray, label: str) -> np.ndarray:
    """The map with its colour bar on the right (a short map is padded with white below)."""
    h, w = image.shape[:2]
    height = max(h, BAR_MIN_HEIGHT)
    out = np.full((height, w + BAR_WIDTH, 3), 255, np.uint8)
    out[:h, :w] = image
    out[:, w:] = colour_bar(height, label)
    return out


class SlideView(NamedTuple):
    """What a heatmap takes from the slide itself, when it opens."""

    image: np.ndarray | None  # thumbnail, longer side MAX_SIDE (None: drawn on white)
    source: str  # "slide", or why it could not be opened
    size: tuple[int, int] | None  # level-0 width and height
    origin: tuple[int, int]  # QuPath's (0, 0) in level-0 pixels (regions.qupath_origin)


def slide_thumbnail(slide: str | Path | None) -> SlideView:
    """The slide's thumbnail, size and QuPath origin, or None and why not (the heatmap is then drawn on white)."""
    if not slide:
        return SlideView(None, "no slide known for these features", None, (0, 0))
    from foundation_domains.pathology.regions import qupath_origin
    from foundation_domains.pathology.slide import open_slide

    try:
        with open_slide(slide) as s:
            size = (int(s.dimensions[0]), int(s.dimensions[1]))
            return SlideView(s.thumbnail(MAX_SIDE), "slide", size, qupath_origin(s.properties, size))
    except Exception as e:  # any reader error: the heatmap does not need the picture, the summary says why
        return SlideView(None, f"{slide}: {e}", None, (0, 0))


def is_ours(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get(MARK[0]) == MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def check_heatmap_dir(folder: Path, inputs: list[Path]) -> None:
    """``--heatmaps`` is new, empty, or holds only heatmaps of ours; never an input.

    Raises:
        OutputError: naming the folder and why it was left alone.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--heatmaps {str(folder)!r} is a file; give a folder")
    resolved = folder.resolve()
    for path in inputs:
        if resolved == path.resolve() or resolved in path.resolve().parents:
            raise OutputError(
                f"--heatmaps {str(folder)!r} is (or holds) an input of this command; give another"
            )
    if folder.is_dir():
        foreign = [p.name for p in folder.iterdir() if not (p.suffix == ".png" and is_ours(p))]
        if foreign:
            raise OutputError(
                f"--heatmaps {str(folder)!r} holds files that are not heatmaps of ours ({', '.join(foreign[:3])}); "
                "give a new or empty folder"
            )
    elif not folder.parent.is_dir():
        raise OutputError(f"the parent folder of --heatmaps {str(folder)!r} does not exist")


def write_heatmap(
    path: Path,
    feature_file: Path,
    attention: np.ndarray,
    title: str,
    *,
    label: str = ATTENTION_LABEL,
    as_percentiles: bool = True,
    background: np.ndarray | None = None,
    slide_known: bool = False,
    slide_size: tuple[int, int] | None = None,
    text: dict[str, str] | None = None,
) -> Path:
    """One slide's heatmap PNG with its colour bar, written atomically and read back.

    ``attention`` is any per-tile score: drawn as percentiles within the slide (attention), or as they are
    when ``as_percentiles`` is False (probabilities, 0 to 1). The background is ``background`` when the caller
    found the slide (``slide_known``; its level-0 size ``slide_size``), else the thumbnail of the slide recorded
    in the feature file, else white.

    Raises:
        DataError: the feature file's tiles cannot be read or do not match ``attention``; OutputError: not written.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    coords, side, size, slide = tile_geometry(feature_file)
    if len(coords) != len(attention):
        raise DataError(f"{feature_file}: {len(coords)} tiles but {len(attention)} attention values")
    if not slide_known:
        background, _, slide_size, _ = slide_thumbnail(slide)
    # the size the file records, else the slide's (the thumbnail shows all of it), else what the tiles reach
    size = size or slide_size or (int(coords[:, 0].max() + side), int(coords[:, 1].max() + side))
    scores = percentiles(attention) if as_percentiles else np.clip(np.asarray(attention, np.float64), 0, 1)
    image = with_colour_bar(heat_image(coords, scores, side, size, background), label)
    info = PngInfo()
    info.add_text(*MARK)
    info.add_text("title", title)
    info.add_text("scale", label)
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()

    def verify(tmp: Path) -> None:
        if not is_ours(tmp):
            raise OutputError(f"{path}: read back is not the heatmap written")

    return write_verified(path, lambda tmp: tmp.write_bytes(data), verify)
