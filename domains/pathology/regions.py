"""Annotated regions that restrict tiling: one GeoJSON per slide, as QuPath exports annotations.

QuPath writes shapes in level-0 pixel coordinates, origin at the top-left corner of the full-resolution image
as QuPath shows it (its "Export as GeoJSON": a FeatureCollection, a list of Features, or one Feature); a MIRAX
slide is shown cropped to its OpenSlide bounds, so its shapes are shifted by :func:`qupath_origin`. Every
Polygon and MultiPolygon of the file counts, whatever its classification; holes are respected; points, lines
and polygons without area are ignored. A tile is kept when its centre lies inside a polygon (inside the outer
ring and in none of its holes): one rule that does not depend on how finely the annotation was drawn.
Point-in-polygon tests use ``matplotlib.path.Path`` (already a dependency).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError
from foundation_domains.pathology.slide_refs import SlideRef, slide_name

SUFFIX = ".geojson"
_POLYGONS = ("Polygon", "MultiPolygon")
BOUNDS = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")


@dataclass(frozen=True)
class Region:
    """The polygons of one region file: each an outer ring and its holes (``K x 2`` float, level-0 pixels)."""

    path: Path
    polygons: tuple[tuple[np.ndarray, tuple[np.ndarray, ...]], ...]
    sha256: str  # of the file's bytes: a feature file made with another region is not complete

    def contains(self, points: np.ndarray) -> np.ndarray:
        """``N`` bool: which ``N x 2`` level-0 points lie inside the region."""
        from matplotlib.path import Path as Polyline

        points = np.asarray(points, np.float64).reshape(-1, 2)
        inside = np.zeros(len(points), bool)
        for outer, holes in self.polygons:
            here = Polyline(outer).contains_points(points)
            for hole in holes:
                here &= ~Polyline(hole).contains_points(points)
            inside |= here
        return inside


def qupath_origin(properties: Mapping[str, str], dimensions: tuple[int, int]) -> tuple[int, int]:
    """Where QuPath's image starts in the slide's level-0 pixels. QuPath opens a slide with OpenSlide bounds
    (MIRAX) cropped to them (its ``OpenslideImageServer``, when both the bounds' width and height differ from the
    slide's), so its coordinates are ours minus ``(bounds-x, bounds-y)``; (0, 0) for every other slide."""
    try:
        x, y, width, height = (int(properties[key]) for key in BOUNDS)
    except (KeyError, ValueError):
        return 0, 0
    return (x, y) if width != dimensions[0] and height != dimensions[1] else (0, 0)


def _ring(value: Any, where: str) -> np.ndarray:
    try:
        ring = np.asarray(value, np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: a ring must be a list of [x, y] numbers") from e
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3 or not np.isfinite(ring).all():
        raise ValueError(f"{where}: a ring needs 3 or more finite [x, y] points")
    return ring[:, :2]


def _area(ring: np.ndarray) -> float:
    """The ring's area in square pixels (shoelace formula; either orientation)."""
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _polygon(rings: Any, where: str) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    if not isinstance(rings, list) or not rings:
        raise ValueError(f"{where}: a Polygon's coordinates must be a list of rings")
    return _ring(rings[0], where), tuple(_ring(r, f"{where} hole {i}") for i, r in enumerate(rings[1:], 1))


def _geometries(obj: Any, where: str) -> list[tuple[str, Any, str]]:
    """``(type, coordinates, where)`` of every geometry in a GeoJSON value."""
    if isinstance(obj, list):  # QuPath's export without FEATURE_COLLECTION: a plain list of Features
        return [g for i, item in enumerate(obj) for g in _geometries(item, f"{where}[{i}]")]
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a GeoJSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _geometries(obj.get("features") or [], f"{where}.features")
    if kind == "Feature":
        geometry = obj.get("geometry")
        return [] if geometry is None else _geometries(geometry, f"{where}.geometry")
    if kind == "GeometryCollection":
        return _geometries(obj.get("geometries") or [], f"{where}.geometries")
    if isinstance(kind, str) and "coordinates" in obj:
        return [(kind, obj["coordinates"], where)]
    raise ValueError(f"{where}: not a GeoJSON Feature, FeatureCollection or geometry (type {kind!r})")


def read_region(path: str | Path) -> Region:
    """The polygons of a GeoJSON region file.

    Raises:
        DataError: naming the file: unreadable, not JSON, not GeoJSON, a malformed polygon, or no polygon at all.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"region file {path}: cannot be read ({e.strerror or e})") from e
    try:
        geometries = _geometries(json.loads(data), "$")
        polygons = []
        for kind, coordinates, where in geometries:
            if kind == "Polygon":
                polygons.append(_polygon(coordinates, where))
            elif kind == "MultiPolygon":
                if not isinstance(coordinates, list):
                    raise ValueError(f"{where}: a MultiPolygon's coordinates must be a list of polygons")
                polygons += [_polygon(p, f"{where}[{i}]") for i, p in enumerate(coordinates)]
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"region file {path}: not usable GeoJSON ({e})") from e
    if not polygons:
        raise DataError(
            f"region file {path}: holds no Polygon or MultiPolygon (export the annotations from QuPath as GeoJSON)"
        )
    flat = len(polygons)
    polygons = [(outer, holes) for outer, holes in polygons if _area(outer) > 0]  # a line drawn closed
    if not polygons:
        raise DataError(
            f"region file {path}: its {flat} polygon(s) have no area (each outer ring is a line or a point)"
        )
    return Region(path, tuple(polygons), hashlib.sha256(data).hexdigest())


def region_names(slide: SlideRef) -> list[str]:
    """File names a slide's region may have: ``<stem>.geojson`` (QuPath's image name without its extension),
    the name with every suffix dropped (``b.ome.tif`` -> ``b``), or the whole file name (``a.svs.geojson``).
    A DICOM folder's is its folder name; a URL's, the name of its last part."""
    name = slide_name(slide)
    stem = name if isinstance(slide, Path) and slide.is_dir() else Path(name).stem
    bare = name.split(".")[0] or stem
    return list(dict.fromkeys(f"{n}{SUFFIX}" for n in (stem, bare, name)))


def region_for(slide: SlideRef, folder: str | Path | None, name: str | None = None) -> Region | None:
    """The region of ``slide`` from ``folder`` (``data.options.regions``), or None when no folder is given.

    ``name`` is the slide's name among the slides processed (``embed``'s feature file stem): a slide whose stem
    repeats is named with its folders (``x/s.svs`` is ``x__s``) or its suffix (``s.svs`` beside ``s.tif``), and
    only that name is its region (``x__s.geojson``; ``s.geojson`` could be either slide's annotation).

    Raises:
        DataError: the folder is given but holds no region for this slide, or its file is broken (named).
    """
    if folder is None:
        return None
    folder = Path(folder)
    names = region_names(slide)
    if name is not None and f"{name}{SUFFIX}" != names[0]:  # renamed: another slide has its own name
        names = [f"{name}{SUFFIX}"]
    for candidate in names:
        if (folder / candidate).is_file():
            return read_region(folder / candidate)
    shared = " (another slide has its name)" if len(names) == 1 and name is not None else ""
    raise DataError(
        f"{slide}: no region file in {folder} (looked for {', '.join(names)}{shared}); with "
        "data.options.regions every slide needs one (a slide without annotations is skipped)"
    )


def region_digest(region: Region | None) -> str:
    """What a feature file records of the region it was tiled in ('' for none)."""
    return "" if region is None else region.sha256
