"""Tile scores as GeoJSON that QuPath imports: one square per tile with its measurements.

QuPath (0.4 and later; ``PathObjectTypeAdapters``) reads a FeatureCollection of ``"type": "Feature"`` objects:
``geometry`` a Polygon in level-0 pixels (origin at the top-left corner of the full-resolution image as QuPath
shows it: a MIRAX slide cropped to its OpenSlide bounds starts at ``qupath_origin``, so tiles are shifted by it),
``properties.objectType`` (``"tile"`` makes tile objects, a kind of detection, so *Measure > Show measurement
maps* colours them), ``properties.measurements`` a map of name to number, and ``properties.classification``
``{"name", "color": [r, g, b]}``. Drag the file onto the slide open in QuPath, or *File > Import objects*.
Our files carry a foreign member ``"foundation": "slide-heatmap"`` (ignored by readers) so only they are replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import OutputError
from foundation.outputs import write_verified

MARK = ("foundation", "slide-heatmap")
KEY = "foundation_key"  # what the scores were computed from (a rerun with the same key has nothing to do)
OBJECT_TYPE = "tile"


def _number(value: float) -> float:
    return float(f"{float(value):.6g}")


def _colour(index: int) -> list[int]:
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab10"](index % 10)
    return [round(r * 255), round(g * 255), round(b * 255)]


def tile_collection(
    coords: np.ndarray,
    side: int,
    measurements: dict[str, np.ndarray],
    classification: list[str] | None = None,
    classes: list[str] | None = None,
    key: str = "",
) -> dict[str, Any]:
    """The FeatureCollection: tile ``i`` is the square ``coords[i]`` to ``coords[i] + side`` (level-0 pixels) with
    ``measurements[name][i]`` and, when given, the class ``classification[i]`` (coloured by its index in
    ``classes``)."""
    colours = {c: _colour(i) for i, c in enumerate(classes or [])}
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, np.int64).tolist()):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        properties: dict[str, Any] = {
            "objectType": OBJECT_TYPE,
            "measurements": {name: _number(values[i]) for name, values in measurements.items()},
        }
        if classification is not None:
            name = classification[i]
            properties["classification"] = {"name": name, "color": colours.get(name, _colour(0))}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", MARK[0]: MARK[1], KEY: key, "features": features}


def recorded_origin(feature_file: Path) -> tuple[int, int] | None:
    """QuPath's origin in the slide's level-0 pixels as ``embed`` recorded it (``qupath_origin``), or None when the
    file does not say (written before it did, or by another tool)."""
    import h5py

    try:
        with h5py.File(feature_file, "r") as f:
            value = f.attrs.get("qupath_origin")
    except OSError:
        return None
    return None if value is None else (int(value[0]), int(value[1]))


def is_our_geojson(path: Path) -> bool:
    """A GeoJSON this command wrote (its mark at the top level)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(MARK[0]) == MARK[1]


def stored_key(path: Path) -> str | None:
    """The key an earlier GeoJSON of ours was written with (None when it is not ours or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get(KEY) if isinstance(data, dict) and data.get(MARK[0]) == MARK[1] else None


def write_tile_geojson(path: Path, collection: dict[str, Any]) -> Path:
    """Write ``collection`` atomically, parsed back and compared before the rename.

    Raises:
        OutputError: not written (no space left, ...) or read back otherwise; ``path`` is untouched.
    """
    text = json.dumps(collection, separators=(",", ":"))

    def verify(tmp: Path) -> None:
        if json.loads(tmp.read_text(encoding="utf-8")) != collection:
            raise OutputError(f"{path}: read back differs from what was written")

    return write_verified(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), verify)
