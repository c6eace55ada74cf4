"""JSON result files (band statistics, metrics) that replace only an earlier file of the same kind of ours.

Each file carries a marker key, ``"foundation_output": KIND``; a file written before the marker existed is
recognised by keys only that kind of file has. Anything else at ``--out`` (a user's notes, a model, a scene,
a folder) is refused with or without ``--overwrite``, and so is an output that is, or would replace, an input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from foundation.errors import OutputError
from foundation.outputs import check_not_input, write_verified

MARKER_KEY = "foundation_output"


def is_our_json(path: Path, kind: str, legacy_keys: Iterable[str] = ()) -> bool:
    """``path`` is a JSON object we wrote as ``kind``: it has our marker, or (older files) every
    ``legacy_keys``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    if MARKER_KEY in data:
        return data[MARKER_KEY] == kind
    required = set(legacy_keys)
    return bool(required) and required <= data.keys()


def check_json_output(
    out: Path, kind: str, inputs: Iterable[Path], *, legacy_keys: Iterable[str] = (), flag: str = "--out"
) -> None:
    """Refuse, before any work, an ``out`` that is (or would replace) an input, or an existing path that
    is not a ``kind`` JSON of ours.

    Raises:
        OutputError: naming ``out`` and why it was left alone.
    """
    out = Path(out)
    check_not_input(out, inputs, flag=flag)
    if out.is_dir():
        raise OutputError(f"{flag} {str(out)!r} is a folder; give a .json file to write")
    if out.exists() and not is_our_json(out, kind, legacy_keys):
        raise OutputError(
            f"{flag} {str(out)!r} exists and is not a {kind} file written by foundation; it was left alone "
            "(move it or choose another path)"
        )


def write_json_output(
    path: Path, kind: str, data: dict[str, Any], verify: Callable[[Path], Any] | None = None
) -> Path:
    """Write ``data`` with our marker atomically, read back (``verify``, default: parse) before the rename.

    Raises:
        OutputError: it cannot be written, naming ``path`` and the reason (e.g. no space left on device).
    """
    text = json.dumps({MARKER_KEY: kind, **data}, indent=2) + "\n"
    check = verify or (lambda tmp: json.loads(tmp.read_text()))
    return write_verified(Path(path), lambda tmp: tmp.write_text(text), check)
