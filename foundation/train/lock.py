"""A run folder is locked while a process trains in it: ``RUN/.lock`` holds the holder's pid, host and start
time. A second process is refused with a message naming the holder; a lock left by a killed process on this
host (its pid is gone, or now belongs to a process that started later) is detected and taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from foundation.errors import FoundationError
from foundation.outputs import pid_running

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(FoundationError, OSError):
    """Another live process trains in this run folder."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _holder_is_gone(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell from here: refuse rather than guess
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not pid_running(pid):
        return True
    start = _process_start(pid)
    return start is not None and holder.get("process_start") not in (None, start)


class RunLock:
    """``with RunLock(run_dir): ...`` holds the lock for the block (re-entrant within one process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._held = False

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by a process killed mid-write (we write it atomically, so rare)
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> RunLock:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        tmp = self.path.with_name(f".lock.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic create-with-content: fails when a lock exists
                    self._held = True
                    return self
                except FileExistsError:
                    holder = self._read()
                    if holder is None:
                        continue  # released meanwhile
                    if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                        self._held = True
                        return self
                    if holder and not _holder_is_gone(holder):
                        raise RunLockedError(
                            f"{self.path.parent} is in use: pid {holder.get('pid')} on host {holder.get('host')} "
                            f"trains there since {holder.get('since')} ({holder.get('command', '')!s}). Wait for "
                            f"it to finish or give another --out; if that process is surely gone, delete {self.path}"
                        ) from None
                    log.warning(
                        "%s: taking over the lock of pid %s on %s, which no longer runs",
                        self.path.parent,
                        holder.get("pid", "?"),
                        holder.get("host", "?"),
                    )
                    self.path.unlink(missing_ok=True)
            raise RunLockedError(f"{self.path}: could not take the lock (another process keeps taking it)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self._held:
            return
        holder = self._read()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
