"""Checkpoints that resume exactly: written atomically, the last k kept, read with ``weights_only=True``.

One file ``step_XXXXXXXX.pt`` (DDP), or a folder ``step_XXXXXXXX/`` of shards (FSDP, :mod:`foundation.train.dcp`).
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from foundation.errors import CheckpointError
from foundation.outputs import write_verified
from foundation.train import dcp

log = logging.getLogger(__name__)

_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first: files and sharded folders (temporary ones are ignored; a sharded
    folder with a missing file is listed, and refused by name when it is loaded)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in d.iterdir()
        if (m := _PATTERN.match(p.name)) and (p.is_dir() if m.group(2) is None else p.is_file())
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write ``step_XXXXXXXX.pt`` via a temporary file and ``os.replace``, then prune to the last ``keep``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(d)
    path = d / f"step_{step:08d}.pt"
    write_verified(path, lambda tmp: torch.save(state, tmp), _verify_archive)
    prune(run_dir, keep)
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Keep the last ``keep`` checkpoints of the run (its own files and shard folders only)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.is_dir():
            dcp.remove_shard_folder(old)
        else:
            old.unlink(missing_ok=True)


def _verify_archive(path: Path) -> None:
    """Every member of the written zip archive reads back with its CRC (a short write fails here)."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} does not read back")


def _remove_stale_temporaries(d: Path) -> None:
    """Half-written checkpoints of a killed process (the run lock makes this process the only writer)."""
    for p in d.iterdir():
        if p.name.endswith(".pt.tmp") or (p.name.startswith(".tmp-") and p.name.endswith(".pt")):
            p.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only). A sharded checkpoint gives its metadata
    only (``sharded: True``); the trainer loads its tensors into its own layout.

    Raises:
        CheckpointError: unreadable or truncated file; a sharded checkpoint with a missing file.
    """
    if Path(path).is_dir():
        return dcp.read_meta(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from e


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
