"""Frozen features for evaluation, and an on-disk cache so kNN / linear probes do not re-run the backbone.

Features are extracted once per (checkpoint, dataset, pooling) and stored as HDF5; the cache file is written
under a temporary name and renamed, so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from foundation.errors import ConfigError, DataError

POOLINGS = ("cls", "cls+mean")
CPU = torch.device("cpu")

FeatureTriple = tuple[Tensor, Tensor, list[str]]


def _collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels and keep ids as a list; a missing key is reported by name, not as a bare
    KeyError from inside a worker."""
    try:
        images = torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items])
        labels = torch.as_tensor([int(it["label"]) for it in items], dtype=torch.int64)
        ids = [str(it["id"]) for it in items]
    except KeyError as e:
        raise DataError(
            f"dataset item is missing key {e.args[0]!r}; expected 'image', 'label' and 'id'"
        ) from e
    return {"image": images, "label": labels, "id": ids}


def _pool(out: dict[str, Tensor], pooling: str) -> Tensor:
    if pooling == "cls":
        return out["cls"]
    return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)


def extract_features(
    backbone: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = CPU,
    pooling: str = "cls",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> FeatureTriple:
    """Run a frozen backbone over a labelled dataset, in dataset order.

    The backbone is moved to ``device`` and put in eval mode for the pass (its previous train/eval mode is
    restored afterwards), so the features are those of the deterministic network.

    Args:
        backbone: module with ``forward_dict(x) -> {"cls": (B, E), "patch": (B, N, E), ...}``.
        dataset: a ``LabelledDataset`` (``dataset[i] -> {"image", "label", "id"}``).
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes.
        device: where the forward passes run.
        pooling: ``"cls"`` (D = E) or ``"cls+mean"`` (CLS concatenated with the mean patch token, D = 2E).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16`` on GPU); None runs in full precision.
        progress: show a tqdm progress bar.

    Returns:
        ``(features (N, D) float32, labels (N,) int64, ids)`` on the CPU.

    Raises:
        ConfigError: unknown ``pooling`` or a non-positive ``batch_size``.
        DataError: the dataset is empty or an item lacks a key.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    if len(dataset) == 0:
        raise DataError(f"cannot extract features from an empty dataset ({type(dataset).__name__})")
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    was_training = backbone.training
    backbone.to(device).train(False)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    ids: list[str] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
                x = batch["image"].to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = backbone.forward_dict(x)
                feats.append(_pool(out, pooling).float().cpu())
                labels.append(batch["label"])
                ids.extend(batch["id"])
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels), ids


def feature_cache_key(*parts: str) -> str:
    """A short, filesystem-safe cache key: the first 16 hex digits of sha256 over the NUL-joined parts.

    NUL cannot occur in paths or config strings, so ``("ab", "c")`` and ``("a", "bc")`` get different keys.
    """
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]


def _load(path: Path) -> FeatureTriple | None:
    """The cached triple, or None when the file is unreadable or was never marked complete."""
    try:
        with h5py.File(path, "r") as f:
            if not bool(f.attrs.get("complete", False)):
                return None
            features = torch.from_numpy(np.asarray(f["features"][()], dtype=np.float32))
            labels = torch.from_numpy(np.asarray(f["labels"][()], dtype=np.int64))
            ids = [str(s) for s in f["ids"].asstr()[()]]
    except (OSError, KeyError):
        return None
    return features, labels, ids


def _write(path: Path, features: Tensor, labels: Tensor, ids: list[str]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".h5.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.numpy())
            f.create_dataset("labels", data=labels.numpy())
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs["complete"] = True  # last, so a partly written file never reads as complete
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_features(cache_dir: Path, key: str, compute: Callable[[], tuple]) -> FeatureTriple:
    """Load ``(features, labels, ids)`` from ``cache_dir / f"{key}.h5"``, or compute and store them.

    A file without the ``complete=True`` attribute (or one that cannot be read) is treated as absent and
    recomputed; the new file is written to a temporary name and renamed atomically.

    Args:
        cache_dir: folder for the cache files (created if missing).
        key: file stem, e.g. from :func:`feature_cache_key`.
        compute: zero-argument callable returning ``(features (N, D), labels (N,), ids)``.

    Returns:
        ``(features (N, D) float32, labels (N,) int64, ids)``.

    Raises:
        ConfigError: ``key`` is empty or not a plain file name.
        DataError: ``compute`` returned mismatched lengths or features that are not 2-D.
    """
    if not key or key in (".", "..") or any(sep in key for sep in ("/", "\\", os.sep, "\x00")):
        raise ConfigError(f"cache key={key!r} must be a non-empty file name without path separators")
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.h5"
    if path.exists():
        loaded = _load(path)
        if loaded is not None:
            return loaded
    features, labels, ids = compute()
    features = torch.as_tensor(features).detach().to("cpu", torch.float32).contiguous()
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).contiguous()
    ids = [str(i) for i in ids]
    if features.ndim != 2 or labels.ndim != 1 or not (features.shape[0] == labels.shape[0] == len(ids)):
        raise DataError(
            f"compute() for cache {str(path)!r} returned features {tuple(features.shape)!r}, "
            f"labels {tuple(labels.shape)!r} and {len(ids)!r} ids; expected (N, D), (N,) and N ids"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write(path, features, labels, ids)
    return features, labels, ids


def remap_labels(
    train_classes: list[str], val_classes: list[str], labels: torch.Tensor, path: str
) -> torch.Tensor:
    """Validation labels in the training set's class order (classes are matched by name)."""
    index = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in val_classes if c not in index]
    if missing:
        raise DataError(f"{path}: classes {missing} do not occur in the training data")
    table = torch.tensor([index[c] for c in val_classes], dtype=torch.long)
    return table[labels]
