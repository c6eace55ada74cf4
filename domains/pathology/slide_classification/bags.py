"""Bags of tile features: the ``FEATS/<slide>.h5`` files of ``foundation embed``, looked at once, read one at a time.

A folder is one kind of feature: one width and one backbone (a model trained on one backbone's features means
nothing on another's). Files that cannot be used (truncated, not ours, unfinished, no tiles) are listed with the
reason and skipped; the others go on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from foundation.errors import ConfigError, DataError


@dataclass(frozen=True)
class Bag:
    """One slide's feature file: ``slide_id`` is the file's stem (the name ``embed`` gave it)."""

    slide_id: str
    path: Path
    n_tiles: int
    dim: int
    backbone: str  # the weights' fingerprint ('' when the file does not say)


@dataclass(frozen=True)
class FeatureFolder:
    """The usable bags of a folder (by slide id) and the files skipped, with their reasons."""

    bags: dict[str, Bag]
    skipped: list[dict[str, str]]
    dim: int
    backbone: str


def look_bag(path: Path) -> Bag:
    """A feature file's slide id, width and backbone without reading its features (the folder check, the
    heatmap's scan).

    Raises: DataError naming the file: unreadable (truncated, not HDF5), no 2-D ``features``, no tiles."""
    try:
        with h5py.File(path, "r") as f:
            features = f.get("features")
            if not isinstance(features, h5py.Dataset) or features.ndim != 2:
                raise DataError(
                    f"{path}: no 2-D 'features' dataset (not a feature file of `foundation embed`)"
                )
            if "complete" in f.attrs and not bool(f.attrs["complete"]):
                raise DataError(f"{path}: unfinished feature file (complete=False); rerun `foundation embed`")
            n, dim = (int(v) for v in features.shape)
            backbone = f.attrs.get("backbone_fingerprint", "")
    except OSError as e:
        raise DataError(f"{path}: cannot be read (truncated or not HDF5: {e})") from e
    if n == 0:
        raise DataError(f"{path}: empty bag (0 tiles)")
    return Bag(path.stem, path, n, dim, str(backbone))


def scan_features(folder: str | Path) -> FeatureFolder:
    """Every ``*.h5`` of ``folder`` (not its temporaries), checked for one width and one backbone.

    Raises:
        ConfigError: ``folder`` is not a folder or holds no feature file.
        DataError: features of different widths or backbones, each kind named with its files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"--features {str(folder)!r} is not a folder (give the --out folder of `foundation embed`)"
        )
    bags: dict[str, Bag] = {}
    skipped = []
    for path in sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".")):
        try:
            bag = look_bag(path)
        except DataError as e:
            skipped.append({"slide": path.stem, "file": str(path), "reason": str(e)})
            continue
        bags[bag.slide_id] = bag
    if not bags:
        reasons = f" (first skipped: {skipped[0]['reason']})" if skipped else ""
        raise ConfigError(f"--features {str(folder)!r} holds no usable feature file (*.h5){reasons}")
    kinds: dict[tuple[int, str], list[str]] = defaultdict(list)
    for bag in bags.values():
        kinds[(bag.dim, bag.backbone)].append(bag.path.name)
    if len(kinds) > 1:
        listed = "; ".join(
            f"{dim} features from backbone {backbone[:12] or 'unknown'!r}: {', '.join(names[:4])}"
            + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            for (dim, backbone), names in sorted(kinds.items(), key=lambda kv: -len(kv[1]))
        )
        raise DataError(
            f"{folder} mixes features of different widths or backbones ({listed}); one folder must hold one "
            "backbone's features: embed the slides again with one backbone, or split the folder"
        )
    (dim, backbone), _ = next(iter(kinds.items()))
    return FeatureFolder(bags, skipped, dim, backbone)


def read_bag(
    path: Path, max_tiles: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``N x D`` float32 features; with ``max_tiles`` a random subset of at most that many rows (in file order),
    so a bag larger than memory allows is sampled, not loaded whole.

    Raises:
        DataError: the file cannot be read (named).
    """
    try:
        with h5py.File(path, "r") as f:
            data = f["features"]
            n = data.shape[0]
            if max_tiles is None or n <= max_tiles:
                array = data[()]
            else:
                keep = torch.randperm(n, generator=generator)[:max_tiles].sort().values.numpy()
                array = _rows(data, keep)
    except (OSError, KeyError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _rows(data: h5py.Dataset, keep: np.ndarray) -> np.ndarray:
    """Rows ``keep`` (sorted) of ``data``: HDF5 point selection is slow for thousands of rows, so rows are read in
    contiguous runs of at most 1,024 and only the wanted ones kept (never more than 1,024 extra rows in memory)."""
    out = np.empty((len(keep), data.shape[1]), np.float32)
    start = 0
    while start < len(keep):
        lo = int(keep[start])
        end = int(np.searchsorted(keep, lo + 1024, side="left"))
        block = data[lo : int(keep[end - 1]) + 1]
        out[start:end] = block[keep[start:end] - lo]
        start = end
    return out
