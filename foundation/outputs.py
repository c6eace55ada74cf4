"""Outputs that never cost a user a file (GDAL's and PyTorch DCP's discipline: refuse clearly, change nothing).

Three rules, one function each:

- **Ownership.** A folder we write carries a small marker (``.foundation.json``: kind, version, the files we put
  there). Only a marked folder of the expected kind is ever replaced, only with ``--overwrite`` (or by the command
  that owns it, e.g. a run's own ``export/``), only when it holds nothing but our files, and only file by file:
  never ``rmtree`` of a path a user gave (:func:`check_output_dir`, :func:`publish_dir`).
- **Inputs are sacred.** An output path that is, or would replace, an input of the same command is refused
  (:func:`check_not_input`).
- **Verified, atomic writes.** Outputs are written under a hidden temporary name next to their final one,
  verified (re-opened and read back by the caller's check), then renamed; any failure removes the temporary and
  becomes one :class:`OutputError` naming the path and the OS's reason, "no space left on device" for ENOSPC
  even when a library hid the errno (:func:`write_verified`, :func:`output_error`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from foundation.errors import OutputError

log = logging.getLogger(__name__)

MARKER = ".foundation.json"
_LOW_SPACE_BYTES = 1 << 20  # after a failed write, less than this free means the disk filled up


# -- reasons -------------------------------------------------------------------------------------------------
def _os_error_in(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in ``exc``'s cause/context chain (libraries wrap them)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _disk_nearly_full(path: Path) -> bool:
    for p in (path, *path.parents):
        if p.exists():
            with contextlib.suppress(OSError):
                return shutil.disk_usage(p).free < _LOW_SPACE_BYTES
            return False
    return False


def failure_reason(exc: BaseException, path: Path) -> str:
    """What went wrong writing ``path``, in the OS's words: ``no space left on device`` for ENOSPC, also when
    a library (torch's zip writer, HDF5, GDAL) reports it as "unexpected pos" or "write failed". Call it before
    removing the temporary file (the free space is part of the diagnosis)."""
    os_error = _os_error_in(exc)
    if os_error is not None and os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if os_error is not None and os_error.errno != errno.EIO:  # the OS said what it was (read-only, ...)
        return os.strerror(os_error.errno).lower()
    if _disk_nearly_full(Path(path)):
        return "no space left on device"
    return str(os_error or exc) or type(exc).__name__


def output_error(exc: BaseException, path: Path, what: str = "cannot write") -> OutputError:
    """One :class:`OutputError` naming ``path`` and the reason (raise it ``from exc``)."""
    return OutputError(f"{path}: {what} ({failure_reason(exc, path)})")


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Refuse, before any work, a folder in which no file can be created (read-only, no permission, full): the
    nearest existing folder at or above ``folder`` is probed with a hidden file, removed at once."""
    folder = Path(folder)
    existing = next((d for d in (folder, *folder.parents) if d.exists()), folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=existing)
    except OSError as e:
        raise output_error(e, existing, f"{flag}: cannot write here") from e
    os.close(fd)
    os.unlink(probe)


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a temporary or lock of a dead one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, someone else's
        return True
    return True


# -- single files ----------------------------------------------------------------------------------------------
def temporary_name(path: Path) -> Path:
    """A hidden name next to ``path`` that keeps its suffixes (GDAL, nibabel and h5py look at them)."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_verified(
    path: Path,
    write: Callable[[Path], Any],
    verify: Callable[[Path], Any] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """``write(tmp)``, flush to disk, ``verify(tmp)`` (re-open and read back; raise on a problem), then rename
    to ``path``. On any failure the temporary is removed and an :class:`OutputError` names ``path`` and the
    reason; ``path`` itself is untouched (a previous file there survives). ``overwrite=False`` refuses an
    existing ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        reason_error = output_error(e, path) if isinstance(e, Exception) else None
        tmp.unlink(missing_ok=True)
        if reason_error is None or isinstance(e, OutputError):
            raise
        raise reason_error from e
    return path


# -- folders we own ----------------------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder we wrote, or None (no marker, unreadable, not ours)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "kind" in marker else None


def _files_under(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MARKER
    )


def write_marker(folder: Path, kind: str, *, files: Iterable[str] | None = None, **info: Any) -> None:
    """Mark ``folder`` as an output of ours of ``kind``; ``files`` (default: every file in it now) are the ones
    a later ``--overwrite`` may remove. ``info`` is kept for checks (e.g. a run's domain and architecture)."""
    from foundation import __version__

    folder = Path(folder)
    listed = sorted(files) if files is not None else _files_under(folder)
    marker = {"kind": kind, "foundation_version": __version__, "files": listed, **info}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / MARKER)


def _same_or_inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_not_input(out: Path, inputs: Iterable[Path], *, flag: str = "--out") -> None:
    """Refuse an output that is an input, holds an input (it would be replaced), or is the same file under
    another name (a hard or symbolic link)."""
    out = Path(out)
    for item in inputs:
        item = Path(item)
        same = _same_or_inside(item, out)
        if not same and out.exists() and item.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, item)
        if same:
            raise OutputError(
                f"{flag} {str(out)!r} is (or holds) the input {str(item)!r}; choose another path"
            )


def check_output_dir(
    out: Path, kind: str, *, overwrite: bool, inputs: Iterable[Path] = (), flag: str = "--out"
) -> None:
    """Refuse, before anything is written, an output folder we may not write: a file, an input (or one that holds
    an input), a non-empty folder that is not a ``kind`` output of ours, one of ours without ``overwrite``, or
    one of ours that also holds files we did not write. A missing folder needs an existing parent."""
    out = Path(out)
    check_not_input(out, inputs, flag=flag)
    if out.is_symlink():  # replacing it would replace the link, and what it points to would be emptied
        raise OutputError(f"{flag} {str(out)!r} is a symbolic link; give the folder it points to")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {str(out)!r} exists and is not a folder")
    if not out.exists():
        if not out.parent.is_dir():
            raise OutputError(f"the parent folder of {flag} {str(out)!r} does not exist; create it first")
        return
    if not any(out.iterdir()):
        return
    marker = read_marker(out)
    if marker is None or marker.get("kind") != kind:
        what = (
            "a folder of other files" if marker is None else f"a {marker.get('kind')} of ours, not a {kind}"
        )
        raise OutputError(f"{flag} {str(out)!r} is {what}; nothing was changed. Give a new or empty folder")
    if not overwrite:
        raise OutputError(f"{flag} {str(out)!r} already holds a {kind}; pass --overwrite to replace it")
    foreign = sorted(set(_files_under(out)) - set(marker.get("files", [])))
    if foreign:
        raise OutputError(
            f"{flag} {str(out)!r} holds files that are not ours ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); nothing was changed. Move them or give another folder"
        )


def remove_our_output(folder: Path) -> None:
    """Remove a marked folder of ours file by file (only the files its marker lists), then its empty
    sub-folders and itself. Anything else found there is left in place and named."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise OutputError(f"{folder} is not an output of ours; nothing was removed")
    ours: set[Path] = set()  # the sub-folders our files made (a user's own empty folder stays)
    for rel in marker.get("files", []):
        target = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not _same_or_inside(target.parent, folder):
            continue
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        ours.update(p for p in target.parents if folder in p.parents)
    (folder / MARKER).unlink(missing_ok=True)
    for d in sorted(ours, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    try:
        folder.rmdir()
    except OSError:
        log.warning(
            "%s: left in place, it holds files that are not ours: %s", folder, _files_under(folder)[:5]
        )


def new_temporary_dir(out: Path) -> Path:
    """A fresh hidden folder next to ``out`` to build it in (removed by :func:`discard_temporary_dir`)."""
    out = Path(out)
    for left in out.parent.glob(f".tmp-*-{glob.escape(out.name)}"):  # a killed earlier call's, on this host
        pid = left.name[len(".tmp-") :].split("-", 1)[0]
        if left.is_dir() and pid.isdigit() and not pid_running(int(pid)) and read_marker(left) is None:
            discard_temporary_dir(left)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    if tmp.exists():  # our own leftover of this pid: a crashed earlier call
        discard_temporary_dir(tmp)
    tmp.mkdir()
    return tmp


def discard_temporary_dir(tmp: Path) -> None:
    """Remove a temporary folder this process made (its name says so); refuses anything else."""
    tmp = Path(tmp)
    if not tmp.name.startswith(".tmp-"):
        raise OutputError(f"{tmp} is not a temporary folder of ours; nothing was removed")
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def building_dir(out: Path, kind: str, *, overwrite: bool, **info: Any) -> Iterator[Path]:
    """Build the output folder ``out`` in a temporary folder; on success mark it and move it into place
    (:func:`publish_dir`); on failure remove the temporary and raise an :class:`OutputError` naming ``out``.
    Call :func:`check_output_dir` first (before any expensive work)."""
    try:
        tmp = new_temporary_dir(out)
    except OSError as e:  # a read-only or full parent: nothing was made
        raise output_error(e, out) from e
    try:
        yield tmp
        write_marker(tmp, kind, **info)
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException as e:
        error = output_error(e, out) if isinstance(e, Exception) and not isinstance(e, OutputError) else None
        discard_temporary_dir(tmp)
        if error is not None:
            raise error from e
        raise


def publish_dir(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move a finished, marked temporary folder to ``out``. An existing ``out`` must be an empty folder or a
    marked output of ours of the same kind (replaced only with ``overwrite``): it is moved aside first, then
    removed file by file, so a crash in between leaves one of the two whole."""
    tmp, out = Path(tmp), Path(out)
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link; nothing was replaced")
    marker = read_marker(tmp)
    if marker is None:
        raise OutputError(f"{tmp}: unmarked folder, not published")
    if not out.exists():
        os.replace(tmp, out)
        return
    check_output_dir(out, marker["kind"], overwrite=overwrite)
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = out.with_name(f".old-{os.getpid()}-{out.name}")
    os.replace(out, old)
    os.replace(tmp, out)
    remove_our_output(old)
