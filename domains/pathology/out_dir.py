"""The ``--out`` folder of ``embed`` and ``pathology-qc``: checked before anything is created, created last.

Both commands add files to the folder (a rerun finishes or refreshes it), so it is not replaced as a whole;
what they refuse is a folder they could only damage: a file, the slides themselves (or a folder holding them),
a missing parent, a ``summary.json`` that is not theirs, a folder they cannot write into.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

from foundation.errors import OutputError
from foundation.outputs import check_not_input, output_error, temporary_name


def _is_our_summary(path: Path, key: str) -> bool:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and key in summary


def check_out_dir(out: Path, inputs: Iterable[Path], *, summary_key: str | None) -> None:
    """Refuse an ``--out`` we may not write into (see the module docstring); a ``summary*.json`` in it is ours
    when it holds ``summary_key`` (None: the caller checks its summaries, e.g. with
    :func:`foundation.batch.summary.check_summaries`).

    Raises:
        OutputError: the reason, naming the path; nothing was created or changed.
    """
    check_not_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} exists and is not a folder")
    if not out.parent.is_dir():
        raise OutputError(f"the parent folder of --out {str(out)!r} does not exist; create it first")
    for summary in sorted(out.glob("summary*.json")) if summary_key is not None else ():
        if not _is_our_summary(summary, summary_key):
            raise OutputError(f"{summary} is not a summary of ours; nothing was changed. Give another --out")


def make_out_dir(out: Path) -> None:
    """Create ``out`` (once every check passed) and make sure a file can be written in it.

    Raises:
        OutputError: read-only, no space left, no permission; a folder made here is removed again.
    """
    created = not out.exists()
    try:
        out.mkdir(exist_ok=True)
        probe = temporary_name(out / "write-probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        error = output_error(e, out)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise error from e


def is_disk_full(error: OutputError) -> bool:
    """An output failed for lack of space: later outputs cannot be written either, so the batch stops."""
    return "no space left on device" in str(error)
