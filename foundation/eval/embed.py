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
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from foundation.batch import exit_status
from foundation.errors import DataError, OutputError
from foundation.eval.features import _collate, _pool
from foundation.models.fingerprint import weights_fingerprint
from foundation.outputs import output_error, temporary_name
from foundation.train.lock import ProcessLock, RunLockedError

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
        path.unlink()  # our own hidden partial file (its name is ours; the lock says no one else writes it)
    f = h5py.File(path, "w")
    f.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(min(n, 256), dim))
    f.create_dataset("ids", shape=(n,), dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("labels", shape=(n,), dtype="int64")
    f.create_dataset("valid", shape=(n,), dtype="bool")
    f.attrs["skipped"] = "[]"
    f.attrs["fingerprint"] = fingerprint
    f.attrs["done"] = 0
    f.attrs["complete"] = False
    for key, value in meta.items():
        f.attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value)
    return f


def _first_readable(dataset: Any) -> dict[str, Any]:
    """The first item that decodes (its shape sizes the placeholders of those that do not)."""
    for i in range(len(dataset)):
        try:
            return dataset[i]
        except DataError as e:
            last = e
    raise DataError(f"no item of {len(dataset)} could be read (last: {last})")


def _existing_is_current(out: Path, fingerprint: str, overwrite: bool) -> int | None:
    """The feature dimension of ``out`` when it is complete for these inputs and weights; None when it must be
    (re)computed. A file that is not a feature file of ours is refused, one of ours from other weights or inputs
    is replaced only with ``overwrite``."""
    if not out.exists():
        return None
    if out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a folder; give an HDF5 file name")
    try:
        with h5py.File(out, "r") as f:
            ours = "fingerprint" in f.attrs
            if ours and f.attrs.get("complete") and f.attrs["fingerprint"] == fingerprint:
                return int(f["features"].shape[1])
    except OSError:
        ours = False
    if not ours:
        raise OutputError(f"--out {str(out)!r} exists and is not a feature file of ours; nothing was changed")
    if not overwrite:
        raise OutputError(
            f"{out} holds other features (other weights, inputs or settings); pass --overwrite to replace it"
        )
    return None


def _check_space(out: Path, n: int, dim: int) -> None:
    """HDF5 does not survive a full disk gracefully: refuse up front when the features cannot fit."""
    need = n * (dim * 4 + 8 + 256) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise OutputError(
            f"{out}: cannot write (no space left on device: about {need >> 20} MiB needed, {free >> 20} MiB free)"
        )


def _verify(path: Path, n: int, dim: int, fingerprint: str) -> None:
    with h5py.File(path, "r") as f:
        ok = (
            f["features"].shape == (n, dim)
            and len(f["ids"]) == len(f["labels"]) == n
            and f.attrs.get("fingerprint") == fingerprint
            and bool(f.attrs["complete"])
        )
        np.asarray(f["features"][-1:])  # the last chunk reads back
    if not ok:
        raise OutputError(f"{path}: the written features do not read back complete")


def _finish(partial: Path, final_tmp: Path) -> tuple[int, list[dict[str, str]]]:
    """The final file from a finished partial one: the rows of the items that decoded (all of them, usually:
    then the partial file is simply renamed). Returns the row count and the skipped items."""
    with h5py.File(partial, "r") as f:
        skipped = json.loads(f.attrs["skipped"])
        valid = np.asarray(f["valid"][()], dtype=bool)
        if valid.all():
            n = len(valid)
        else:
            with h5py.File(final_tmp, "w") as g:
                g.create_dataset("features", data=f["features"][()][valid])
                g.create_dataset("ids", data=f["ids"][()][valid], dtype=h5py.string_dtype("utf-8"))
                g.create_dataset("labels", data=f["labels"][()][valid])
                for key, value in f.attrs.items():
                    g.attrs[key] = value
                g.attrs["done"] = n = int(valid.sum())
    if valid.all():
        os.replace(partial, final_tmp)
    else:
        partial.unlink()
    return n, skipped


class _Tolerant(Dataset):
    """Items that fail to decode become placeholders marked ``ok=False`` (skipped and named, not fatal)."""

    def __init__(self, dataset: Any, indices: range, shape: tuple[int, ...]) -> None:
        self.dataset, self.indices, self.shape = dataset, indices, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        try:
            return {**self.dataset[index], "ok": ""}
        except DataError as e:
            files = getattr(getattr(self.dataset, "folder", None), "files", None)
            name = str(files[index]) if files is not None else str(index)
            return {"image": torch.zeros(self.shape), "label": -1, "id": name, "ok": str(e) or "unreadable"}


def _collate_tolerant(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {**_collate(items), "error": [it["ok"] for it in items]}


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
    overwrite: bool = False,
    normalization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``features`` (N x D float32), ``ids`` (paths) and ``labels`` for ``dataset`` to ``out``.

    The file is complete for one set of inputs, settings and backbone *weights* (a retrained backbone at the same
    path is another backbone). Returns a summary dict (``n``, ``dim``, ``resumed_from``, ``out``).
    """
    out = Path(out)
    if not out.parent.exists():
        raise OutputError(f"the parent folder of --out {str(out)!r} does not exist")
    n = len(dataset)
    if n == 0:
        raise DataError("nothing to embed: the dataset is empty")
    ids = [str(p) for p in getattr(getattr(dataset, "folder", None), "files", [])] or [
        str(i) for i in range(n)
    ]
    weights = weights_fingerprint(backbone)
    fingerprint = _fingerprint(ids, weights, pooling, size)
    dim = _existing_is_current(out, fingerprint, overwrite)
    if dim is not None:
        log.info("%s is already complete", out)
        return {"out": str(out), "n": n, "dim": dim, "resumed_from": n}

    backbone = backbone.to(device).train(False)
    with torch.inference_mode():
        first = _first_readable(dataset)
        probe_shape = tuple(first["image"].shape)
        probe = _collate([first])["image"].to(device)
        dim = int(_pool(backbone.forward_dict(probe), pooling).shape[1])
    partial = out.with_name(f".{out.name}.partial")
    meta = {
        "backbone": backbone_name,
        "backbone_weights": weights,
        "pooling": pooling,
        "img_size": size,
        "classes": list(dataset.classes),
        "normalization": normalization or {},  # the mean/std the inputs were normalised with
    }
    _check_space(out, n, dim)
    final_tmp = temporary_name(out)
    lock = ProcessLock(out.with_name(f".{out.name}.lock"), f"--out {out}")
    try:
        lock.acquire()
        start = _embed_into(
            partial,
            dataset,
            backbone,
            _open_partial(partial, fingerprint, n, dim, meta),
            shape=probe_shape,
            pooling=pooling,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            amp_dtype=amp_dtype,
            progress=progress,
        )
        rows, skipped = _finish(partial, final_tmp)
        if rows == 0:
            final_tmp.unlink(missing_ok=True)
            raise DataError(f"no item of {n} could be read (first: {skipped[0]['reason']})")
        _verify(final_tmp, rows, dim, fingerprint)
        os.replace(final_tmp, out)
    except (OutputError, RunLockedError, DataError):
        final_tmp.unlink(missing_ok=True)
        raise
    except OSError as e:  # HDF5 write errors arrive as OSError; the partial file is of no use
        error = output_error(e, out)
        for tmp in (partial, final_tmp):
            tmp.unlink(missing_ok=True)
        raise error from e
    finally:
        lock.release()
    for item in skipped:
        log.warning("skipped %s: %s", item["id"], item["reason"])
    return {
        "out": str(out),
        "n": rows,
        "dim": dim,
        "resumed_from": start,
        "skipped": skipped,
        "exit_status": exit_status(rows, len(skipped)),
    }


def _embed_into(
    partial: Path,
    dataset: Any,
    backbone: torch.nn.Module,
    f: h5py.File,
    *,
    shape: tuple[int, ...],
    pooling: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool,
) -> int:
    """Fill the open partial file ``f`` from its last complete chunk; returns the item it resumed at."""
    n = len(dataset)
    start = int(f.attrs["done"])
    if start:
        log.info("resuming %s at item %d of %d", partial, start, n)
    loader = DataLoader(
        _Tolerant(dataset, range(start, n), shape),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_tolerant,
        pin_memory=device.type == "cuda",
    )
    skipped = json.loads(f.attrs["skipped"])
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
            f["valid"][done : done + k] = np.array([not e for e in batch["error"]])
            skipped += [{"id": i, "reason": e} for i, e in zip(batch["id"], batch["error"], strict=True) if e]
            f.attrs["skipped"] = json.dumps(skipped)
            done += k
            f.attrs["done"] = done
            f.flush()
            bar.update(k)
        f.attrs["complete"] = True
    return start
