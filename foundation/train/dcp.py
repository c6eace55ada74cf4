"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), for ``train.parallel=fsdp``.

Every rank writes its own shards (``__<rank>_0.distcp``): no rank ever holds the full model. A checkpoint is a
folder ``checkpoints/step_XXXXXXXX/`` with DCP's ``.metadata``, the shard files and ``meta.pt`` (step, every
rank's RNG, config, backbone; read with ``weights_only=True``). It is written as ``.tmp-step_XXXXXXXX/`` and
renamed when every rank has finished and the main rank has checked that each file the metadata names is there,
so a checkpoint is complete or absent. DCP reshards on load: a checkpoint of N ranks loads into M ranks, or into
one process without a process group (``foundation export``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from foundation.errors import CheckpointError
from foundation.outputs import write_verified

META_FILE = "meta.pt"
METADATA_FILE = ".metadata"
_TMP_PREFIX = ".tmp-"
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load, which is intended here (one process, or an export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def is_sharded_checkpoint(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def check_complete(path: Path) -> None:
    """Every file DCP's metadata names is there and long enough, and so is ``meta.pt``.

    Raises:
        CheckpointError: naming the first missing or short file (and the rank that wrote it).
    """
    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"{path}: not a sharded checkpoint ({METADATA_FILE} is missing)")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}: {METADATA_FILE} is not readable ({e})") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name in sorted(needed):
        file = path / name
        match = _RANK_FILE.match(name)
        who = f" (written by rank {match.group(1)})" if match else ""
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: shard file {name}{who} is missing")
        if file.stat().st_size < needed[name]:
            raise CheckpointError(f"{path} is incomplete: shard file {name}{who} is truncated")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path} is incomplete: {META_FILE} is missing")


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's non-tensor state (``sharded: True`` added), after :func:`check_complete`."""
    check_complete(path)
    try:
        meta = torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{Path(path) / META_FILE}: not readable ({e})") from e
    return {**meta, "sharded": True}


def holds_only_shards(path: Path) -> bool:
    """Every entry of ``path`` is a file this writer makes (``.metadata``, ``meta.pt``, rank shards): a folder
    that may be removed. Anything else put there (a user's file, a sub-folder) keeps the folder."""
    return all(
        p.is_file() and (p.name in (METADATA_FILE, META_FILE) or _RANK_FILE.match(p.name))
        for p in Path(path).iterdir()
    )


def remove_shard_folder(path: Path) -> None:
    """Remove a checkpoint folder of ours; one holding anything else is left, with a warning."""
    if holds_only_shards(path):
        shutil.rmtree(path)
    else:
        log.warning("%s holds files that are not checkpoint shards; left in place", path)


def _remove_stale(d: Path) -> None:
    """Half-written checkpoint folders of a killed run (the run lock makes this process the only writer)."""
    for p in d.iterdir():
        if p.name.startswith(f"{_TMP_PREFIX}step_") and p.is_dir():
            remove_shard_folder(p)


@dataclass
class _Pending:
    """A checkpoint being written in the background, renamed into place when done."""

    upload: Future
    tmp: Path
    final: Path
    meta: dict[str, Any]
    after: Callable[[Path], None] | None


class ShardedSaver:
    """Writes ``folder/step_XXXXXXXX/`` checkpoints; every call is a collective (every rank makes it).

    Asynchronous (``dcp.async_save``): the state is first copied to CPU memory, then the files are written by a
    background thread while training goes on, over a gloo group of its own (no collective of the training loop
    waits for the disk). The folder becomes ``step_XXXXXXXX`` only when every rank's shards are written: the main
    rank renames it when it finds the write done (:meth:`poll`), at the next save, or in :meth:`finish`, which the
    loop calls before it ends or exits. A kill before that leaves a ``.tmp-`` folder, never listed.
    """

    def __init__(self, *, asynchronous: bool) -> None:
        self.asynchronous = asynchronous and _distributed()  # one process (DDP-equivalent): written in place
        self.pending: _Pending | None = None
        # its own group: the writer thread's collectives never interleave with the training loop's
        self.group = dist.new_group(backend="gloo") if asynchronous and _distributed() else None

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        folder: Path,
        step: int,
        after: Callable[[Path], None] | None = None,
    ) -> Path:
        """Start (or, synchronous, write) the checkpoint of ``step``; ``after(path)`` runs on the main rank once
        it is in place (pruning, logging). Returns its final path."""
        self.finish()
        final = folder / f"step_{step:08d}"
        tmp = folder / f"{_TMP_PREFIX}{final.name}"
        if _is_main():
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale(folder)
        _barrier()
        if final.exists():  # this step is saved already (SIGTERM right after a checkpoint): the same state
            return final
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _quiet():
            if self.asynchronous:
                upload = dcp.async_save(
                    state, checkpoint_id=str(tmp), process_group=self.group, no_dist=not _distributed()
                )
                self.pending = _Pending(upload, tmp, final, meta, after)
                return final
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        _barrier()  # every rank's shard file is closed
        _commit(tmp, final, meta, after)
        _barrier()
        return final

    def poll(self) -> None:
        """Rename a finished background write into place (no collective: each rank looks at its own write)."""
        if self.pending is not None and self.pending.upload.done():
            self.finish()

    def finish(self) -> None:
        """Wait for the background write, then rename it into place (main rank)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        pending.upload.result()  # the coordinator's future ends after every rank's shards and the metadata
        _commit(pending.tmp, pending.final, pending.meta, pending.after)


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _commit(tmp: Path, final: Path, meta: dict[str, Any], after: Callable[[Path], None] | None) -> None:
    """Main rank: ``meta.pt``, every file on disk and checked, then the rename that makes the checkpoint."""
    if not _is_main():
        return
    write_verified(tmp / META_FILE, lambda p: torch.save(meta, p))
    _fsync_folder(tmp)
    check_complete(tmp)
    os.replace(tmp, final)
    if after is not None:
        after(final)


def save_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], folder: Path, step: int
) -> Path:
    """Write ``folder/step_XXXXXXXX/`` now (a collective: every rank calls it); returns its path."""
    return ShardedSaver(asynchronous=False).save(model, optimizer, meta, folder, step)


def _fsync_folder(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimiser state into ``model``'s own layout (sharded or not, any world size)."""
    # get_state_dict gives a fresh optimiser a state for every parameter (a zero step); a parameter that had
    # none when saved (DINOv2's last layer while frozen) must start again without one, as it would have.
    model_state, optim_state = get_state_dict(model, optimizer)
    saved = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    optim_state["state"] = {
        name: values
        for name, values in optim_state["state"].items()
        if all(f"optimizer.state.{name}.{key}" in saved for key in values)
    }
    state = {"model": model_state, "optimizer": optim_state}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    # not strict: the parameters left without state above stay without
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The model tensors whose names start with ``prefix`` (prefix removed), in one process without a process
    group: each tensor is assembled from the shards of every rank."""
    check_complete(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    full = f"model.{prefix}"
    state = {
        key[len("model.") :]: torch.empty(tuple(info.size), dtype=info.properties.dtype)
        for key, info in metadata.state_dict_metadata.items()
        if key.startswith(full) and isinstance(info, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{path}: holds no tensors under {prefix!r}")
    box = {"model": state}
    with _quiet():
        dcp.load(box, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix) :]: v for k, v in box["model"].items()}
