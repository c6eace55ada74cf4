"""The ``summary.json`` files of a batch: where they go, whose they are, written verified and atomically.

One process writes ``OUT/summary.json``; under torchrun each rank also writes ``OUT/summary_rank{r}.json``
(its own share, on disk even if another rank fails later) and rank 0 the merged ``OUT/summary.json``. A
``summary*.json`` in ``OUT`` that is not ours is refused before any work: it would be replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.errors import OutputError
from foundation.outputs import write_verified

SUMMARY = "summary.json"
Legacy = Callable[[dict[str, Any]], bool]  # recognises a summary an earlier version of a command wrote


def rank_summary_name(rank: int) -> str:
    return f"summary_rank{rank}.json"


def is_our_summary(path: Path, command: str, legacy: Legacy | None = None) -> bool:
    """``path`` is a summary ``command`` wrote: this format with its name, or an older one ``legacy`` knows."""
    try:
        data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if "summary_format" in data:
        return data.get("command") == command
    return legacy is not None and bool(legacy(data))


def check_summaries(out_dir: Path, command: str, legacy: Legacy | None = None) -> None:
    """Refuse, before any work, an ``out_dir`` holding a ``summary*.json`` that is not ``command``'s.

    Raises:
        OutputError: naming the file; nothing was changed.
    """
    if not Path(out_dir).is_dir():
        return
    for path in sorted(Path(out_dir).glob("summary*.json")):
        if not is_our_summary(path, command, legacy):
            raise OutputError(
                f"{path} exists and is not a summary of ours ({command}); nothing was changed. "
                "Move it or give another --out"
            )


def write_summary(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON under a temporary name, read it back, rename.

    Raises:
        OutputError: naming ``path`` and the reason (e.g. no space left on device); nothing is left behind.
    """
    text = json.dumps(data, indent=2)
    return write_verified(
        Path(path), lambda tmp: tmp.write_text(text), lambda tmp: json.loads(tmp.read_text())
    )
