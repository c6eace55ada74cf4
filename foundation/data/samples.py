"""Embedded samples are written once, atomically: into a temporary folder, marked complete, then renamed,
so a crash or a second process never leaves a half-written sample that looks usable."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_sample_folder(root: Path, fill: Callable[[Path], None]) -> Path:
    """Return ``root``, first calling ``fill(tmp)`` to write it if it is not complete yet."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    (tmp / ".complete").touch()
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
