"""Synthetic ``foundation embed`` outputs with a planted signal: a slide of class ``c`` has a few tiles whose
feature ``c`` is high; all its tiles are shifted so every class has the same mean feature (what sets a class apart
is a few tiles, not the bag's average)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def write_bag(path: Path, features: np.ndarray, backbone: str = "f" * 16) -> Path:
    """A feature file with the layout and attributes ``embed`` writes (``coords`` on a 256-px grid)."""
    n = len(features)
    coords = np.stack([np.arange(n) % 32 * 256, np.arange(n) // 32 * 256], 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords)
        f.create_dataset("features", data=features.astype(np.float32))
        f.attrs.update({"complete": True, "n_tiles": n, "backbone_fingerprint": backbone})
    return path


def planted_cohort(
    folder: Path,
    labels_csv: Path,
    *,
    per_class: int = 12,
    classes: int = 2,
    dim: int = 16,
    tiles: tuple[int, int] = (150, 250),
    planted: int = 4,
    signal: float = 5.0,
    slides_per_case: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write ``per_class`` bags per class into ``folder`` and the labels CSV; returns each slide's planted rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, where = [], {}
    for c in range(classes):
        for i in range(per_class):
            n = int(rng.integers(*tiles))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            idx = np.sort(rng.choice(n, planted, replace=False))
            x[idx, c] += signal
            x[:, c] -= planted * signal / n  # the bag's mean feature no longer says which class it is
            slide = f"s{c}_{i:02d}"
            write_bag(folder / f"{slide}.h5", x)
            rows.append(f"{slide},c{c},p{c}_{i // slides_per_case:02d}")
            where[slide] = idx
    labels_csv.write_text("slide_id,label,case_id\n" + "\n".join(rows) + "\n")
    return where
