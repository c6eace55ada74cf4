"""A folder is locked while a process writes in it (a run while it trains, a feature file while it is built).

The lock is the kernel's (``flock`` on ``.lock``), so it is atomic and dies with its holder: a SIGKILLed trainer
leaves no lock that blocks the next one, and two processes that start at once cannot both win. The file also
holds the holder's pid, host, start time and command, so a refused process can name who is working there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from foundation.errors import FoundationError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(FoundationError, OSError):
    """Another live process works in this folder."""


class ProcessLock:
    """``with ProcessLock(path, what): ...`` holds an exclusive lock on ``path`` for the block."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what  # how the refusal names the locked thing, e.g. "run folder runs/x"
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(self.path.read_text() or "{}")
            return holder if isinstance(holder, dict) else {}
        return {}

    def _open_locked(self) -> int | None:
        """An fd holding the lock on the file now at ``path``, or None when a live process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                log.warning("%s: this file system has no locks; nothing stops a second writer", self.path)
                return fd
            try:  # the holder before us may have removed the file between our open and flock: retry
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def acquire(self) -> ProcessLock:
        if self._fd is not None:
            return self
        fd = self._open_locked()
        if fd is None:
            h = self._holder()
            raise RunLockedError(
                f"{self.what} is in use: pid {h.get('pid', '?')} on host {h.get('host', '?')} since "
                f"{h.get('since', '?')} ({h.get('command', '')}); wait for it to finish or choose another --out"
            )
        stale = self._holder()
        if stale.get("pid"):
            log.warning(
                "%s: taking over the lock of pid %s on %s, which no longer runs",
                self.what,
                stale.get("pid"),
                stale.get("host", "?"),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiting process sees the inode change and retries
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ProcessLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunLock(ProcessLock):
    """The lock of a run folder (``RUN/.lock``) while a process trains there."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(Path(run_dir) / LOCK_FILE, f"run folder {run_dir}")
