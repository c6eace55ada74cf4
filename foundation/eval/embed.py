"""``foundation embed``: features of every item of a labelled dataset to one HDF5 file, resumable and atomic.

The file is built as ``OUT.partial`` in chunks; each chunk bumps the ``done`` attribute after its data is
written, so a rerun continues from the last complete chunk. Only when every item is in does the file get
``complete=True`` and its final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from foundation.errors import DataError
from foundation.eval.features import _collate, _pool

log = logging.getLogger(__name__)
_CPU = torch.device("cpu")


def _fingerprint(ids: list[str], backbone: str, pooling: str, size: int) -> str:
    h = hashlib.sha256()
    for part in (backbone, pooling, str(size), *ids):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _open_partial(path: Path, fingerprint: str, n: int, dim: int, meta: dict[str, Any]) -> h5py.File:
    """Reopen a matching partial file, or start a new one."""
    if path.exists():
        try:
            f = h5py.File(path, "a")
            if f.attrs.get("fingerprint") == fingerprint:
                return f
            f.close()
        except OSError:
            pass
        log.warning("%s belongs to other inputs or is damaged; starting over", path)
        path.unlink()
    f = h5py.File(path, "w")
    f.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(min(n, 256), dim))
    f.create_dataset("ids", shape=(n,), dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("labels", shape=(n,), dtype="int64")
    f.attrs["fingerprint"] = fingerprint
    f.attrs["done"] = 0
    f.attrs["complete"] = False
    for key, value in meta.items():
        f.attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value)
    return f


def embed_dataset(
    backbone: torch.nn.Module,
    dataset: Any,
    out: Path,
    *,
    backbone_name: str,
    size: int,
    pooling: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device = _CPU,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``features`` (N x D float32), ``ids`` (paths) and ``labels`` for ``dataset`` to ``out``.

    Returns a summary dict (``n``, ``dim``, ``resumed_from``, ``out``).
    """
    out = Path(out)
    if not out.parent.exists():
        raise DataError(f"the parent folder of --out {str(out)!r} does not exist")
    n = len(dataset)
    if n == 0:
        raise DataError("nothing to embed: the dataset is empty")
    ids = [str(p) for p in getattr(getattr(dataset, "folder", None), "files", [])] or [
        str(i) for i in range(n)
    ]
    fingerprint = _fingerprint(ids, backbone_name, pooling, size)
    if out.exists():
        with h5py.File(out, "r") as f:
            if f.attrs.get("complete") and f.attrs.get("fingerprint") == fingerprint:
                log.info("%s is already complete", out)
                return {"out": str(out), "n": n, "dim": int(f["features"].shape[1]), "resumed_from": n}
        raise DataError(f"{out} exists and holds other features; remove it or choose another --out")

    backbone = backbone.to(device).train(False)
    with torch.inference_mode():
        probe = _collate([dataset[0]])["image"].to(device)
        dim = int(_pool(backbone.forward_dict(probe), pooling).shape[1])
    partial = out.with_name(out.name + ".partial")
    meta = {"backbone": backbone_name, "pooling": pooling, "img_size": size, "classes": list(dataset.classes)}
    f = _open_partial(partial, fingerprint, n, dim, meta)
    start = int(f.attrs["done"])
    if start:
        log.info("resuming %s at item %d of %d", partial, start, n)
    loader = DataLoader(
        Subset(dataset, range(start, n)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    done = start
    with f, tqdm(total=n, initial=start, desc="embed", unit="img", disable=not progress) as bar:
        for batch in loader:
            with torch.inference_mode(), autocast:
                feats = _pool(backbone.forward_dict(batch["image"].to(device, non_blocking=True)), pooling)
            k = feats.shape[0]
            f["features"][done : done + k] = feats.float().cpu().numpy()
            f["ids"][done : done + k] = np.array(batch["id"], dtype=object)
            f["labels"][done : done + k] = batch["label"].numpy()
            done += k
            f.attrs["done"] = done
            f.flush()
            bar.update(k)
        f.attrs["complete"] = True
    os.replace(partial, out)
    return {"out": str(out), "n": n, "dim": dim, "resumed_from": start}
