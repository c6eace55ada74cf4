"""One slide's feature file (the CLAM/TRIDENT layout): built in memory, written in one go, read back, renamed.

HDF5 does not survive a full disk: a failed write part-way through a chunked dataset, or of its metadata at
close, ends in a segfault. So HDF5 never writes to disk here: the whole file is built as an in-memory image
(h5py's ``core`` driver without a backing store) and plain Python writes those bytes under a temporary name,
where a full disk is an ordinary ``OSError``. The file is then re-opened and checked before it takes its final
name, so a file under that name is always whole.

Completeness is keyed on what determines the features: the slide (resolved path, size, mtime), the backbone's
weights (their fingerprint, not the path they were loaded from), pooling, tiling and normalisation. A file of
ours made otherwise is stale: ``embed`` replaces it only with ``--overwrite``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from foundation.errors import OutputError
from foundation.outputs import output_error, write_verified

# Attributes every version of this command wrote: a file with them is an output of ours and may be replaced.
OUR_ATTRS = ("complete", "n_tiles")
_SPACE_MARGIN = 1 << 16  # file-system blocks and metadata beyond the file's own bytes


def _same(stored: Any, wanted: Any) -> bool:
    return stored is not None and np.array_equal(np.asarray(stored), np.asarray(wanted))


def is_ours(path: Path) -> bool:
    """A feature file this command wrote (finished or not)."""
    try:
        with h5py.File(path, "r") as f:
            return all(k in f.attrs for k in OUR_ATTRS)
    except OSError:
        return False


def is_complete(path: Path, key: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """``path`` is a finished feature file whose attributes match every item of ``key``; an attribute the file
    lacks (written before it existed) counts as its value in ``defaults``."""
    if not path.is_file():
        return False
    defaults = defaults or {}
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            return bool(attrs.get("complete")) and all(
                _same(attrs.get(k, defaults.get(k)), v) for k, v in key.items()
            )
    except OSError:  # damaged or not HDF5: not complete (whether it may be replaced is is_ours' call)
        return False


def file_image(
    name: str,
    coords: np.ndarray,
    features: np.ndarray,
    attrs: dict[str, Any],
    coords_attrs: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of the HDF5 file: ``coords`` (N x 2 int64, with ``coords_attrs``: what CLAM and TRIDENT read,
    see ``interop.py``), ``features`` (N x D float32), file attributes ``attrs``."""
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        dset.attrs.update(coords_attrs or {})
        f.create_dataset("features", data=features.astype(np.float32, copy=False))
        f.attrs.update(attrs)
        f.flush()
        return f.id.get_file_image()


def check_written(
    path: Path,
    coords: np.ndarray,
    features: np.ndarray,
    attrs: dict[str, Any],
    coords_attrs: dict[str, Any] | None = None,
) -> None:
    """Re-open ``path`` and compare it with what was meant to be written.

    Raises:
        OutputError: a dataset or attribute differs (a short or corrupted write).
    """
    with h5py.File(path, "r") as f:
        problems = [
            name
            for name, wanted in (("coords", coords), ("features", features))
            if name not in f or not np.array_equal(f[name][()], wanted, equal_nan=True)
        ]
        problems += [f"attribute {k}" for k, v in attrs.items() if not _same(f.attrs.get(k), v)]
        if "coords" in f:
            stored = f["coords"].attrs
            problems += [
                f"coords attribute {k}"
                for k, v in (coords_attrs or {}).items()
                if not _same(stored.get(k), v)
            ]
    if problems:
        raise OutputError(f"{path}: read back differs from what was written ({', '.join(problems)})")


def _check_space(path: Path, size: int) -> None:
    """Refuse before writing when the disk cannot hold ``size`` bytes (a temporary would only fill it up)."""
    free = shutil.disk_usage(path.parent).free
    if free < size:
        raise output_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)


def write_feature_file(
    path: Path,
    coords: np.ndarray,
    features: np.ndarray,
    attrs: dict[str, Any],
    coords_attrs: dict[str, Any] | None = None,
) -> None:
    """Write ``path`` whole or not at all (a hidden temporary, re-opened and checked before the rename).

    Raises:
        OutputError: no space left, another OS refusal or a bad read-back; no temporary is left behind and a
            previous file at ``path`` is untouched.
    """
    image = file_image(path.name, coords, features, attrs, coords_attrs)
    _check_space(path, len(image) + _SPACE_MARGIN)
    write_verified(
        path,
        lambda tmp: tmp.write_bytes(image),
        lambda tmp: check_written(tmp, coords, features, attrs, coords_attrs),
    )
