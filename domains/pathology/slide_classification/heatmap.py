"""Attention heatmaps: where on the slide the model looked, one PNG per scored slide.

Each tile's attention is turned into its percentile within the slide (CLAM's ``convert_to_percentiles``: bags of
10 and 10,000 tiles read on one scale) and painted over the tile's level-0 square (``coords`` and
``patch_size_level0``), on the slide's thumbnail when the slide the features came from (the file's ``slide``
attribute) can still be opened, else on white. PNGs carry a text mark; only marked files are replaced.
"""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np

from foundation.errors import DataError, OutputError
from foundation.outputs import write_verified

MARK = ("foundation", "slide-heatmap")
MAX_SIDE = 1024  # thumbnail's longer side in pixels


def percentiles(attention: np.ndarray) -> np.ndarray:
    """Each value's rank in [0, 1] (ties share the lower rank; one tile is 1)."""
    attention = np.asarray(attention, np.float64)
    if len(attention) == 1:
        return np.ones(1)
    ranks = np.searchsorted(np.sort(attention), attention, side="left")
    return ranks / (len(attention) - 1)


def tile_geometry(feature_file: Path) -> tuple[np.ndarray, int, tuple[int, int], str | None]:
    """Level-0 corners, tile side and slide size of a feature file (from its ``coords`` attributes, or the size
    the tiles cover when the file predates them) and the slide it was made from.

    Raises:
        DataError: the file cannot be read.
    """
    try:
        with h5py.File(feature_file, "r") as f:
            coords = f["coords"][()]
            attrs = dict(f["coords"].attrs)
            side = int(attrs.get("patch_size_level0", f.attrs.get("extent", 256)))
            slide = f.attrs.get("slide")
    except (OSError, KeyError) as e:
        raise DataError(f"{feature_file}: cannot read its tiles ({e})") from e
    width = int(attrs.get("level0_width", coords[:, 0].max() + side))
    height = int(attrs.get("level0_height", coords[:, 1].max() + side))
    return coords, side, (width, height), str(slide) if slide else None


def heat_image(
    coords: np.ndarray, scores: np.ndarray, side: int, size: tuple[int, int], background: np.ndarray | None
) -> np.ndarray:
    """``H x W x 3`` uint8: the tiles' scores in a colour map, half over the background (or white)."""
    from matplotlib import colormaps

    width, height = size
    scale = min(1.0, MAX_SIDE / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if background is None or background.shape[:2] != (h, w):
        import cv2

        base = np.full((h, w, 3), 255, np.uint8) if background is None else cv2.resize(background, (w, h))
    else:
        base = background
    out = base.astype(np.float32)
    colours = colormaps["jet"](scores)[:, :3] * 255
    for (x, y), colour in zip(coords, colours, strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int((x + side) * scale)), max(y0 + 1, int((y + side) * scale))
        out[y0:y1, x0:x1] = 0.5 * out[y0:y1, x0:x1] + 0.5 * colour
    return out.clip(0, 255).astype(np.uint8)


def thumbnail(slide: str | None) -> np.ndarray | None:
    """The slide's thumbnail, or None when it is gone or unreadable (the heatmap is then drawn on white)."""
    if not slide or not Path(slide).exists():
        return None
    from domains.pathology.slide import open_slide

    try:
        with open_slide(slide) as s:
            return s.thumbnail(MAX_SIDE)
    except Exception:  # any reader error: the heatmap does not need the picture
        return None


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


def write_heatmap(path: Path, feature_file: Path, attention: np.ndarray, title: str) -> Path:
    """One slide's heatmap PNG, written atomically and read back.

    Raises:
        DataError: the feature file's tiles cannot be read or do not match ``attention``; OutputError: not written.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    coords, side, size, slide = tile_geometry(feature_file)
    if len(coords) != len(attention):
        raise DataError(f"{feature_file}: {len(coords)} tiles but {len(attention)} attention values")
    image = heat_image(coords, percentiles(attention), side, size, thumbnail(slide))
    info = PngInfo()
    info.add_text(*MARK)
    info.add_text("title", title)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()

    def verify(tmp: Path) -> None:
        if not is_ours(tmp):
            raise OutputError(f"{path}: read back is not the heatmap written")

    return write_verified(path, lambda tmp: tmp.write_bytes(data), verify)
