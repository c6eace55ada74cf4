"""``--nproc N``: re-run the same command under torchrun with N local workers (any command that shards its work
by rank: pretraining, fine-tuning, batch inference).

torchrun ends with 1 whenever a worker exits non-zero, so "some inputs skipped" (2) would read as "nothing done"
(1). A batch command spawned here therefore gets a status file (:data:`STATUS_ENV`): its main rank writes the
batch's exit status there and every worker exits 0 for "some skipped", and the parent returns the status read
back. Under a torchrun started by the user, read ``exit_status`` in ``summary.json``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from foundation.batch.status import EXIT_DONE, EXIT_SOME_SKIPPED

STATUS_ENV = "FOUNDATION_BATCH_STATUS_FILE"


def should_spawn(nproc: int | None) -> bool:
    """``--nproc N`` (N > 1) given to a process that torchrun did not start: spawn the workers."""
    return bool(nproc) and int(nproc) > 1 and "WORLD_SIZE" not in os.environ


def _torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    rest, skip = [], False
    for a in argv:
        if skip:  # the value after "--nproc"
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*head, "-m", "foundation", *rest]


def spawn_local(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Re-run this command (``argv`` without ``--nproc``) under torchrun with ``nproc`` local workers; its exit
    status."""
    return subprocess.call(_torchrun_command(nproc, argv), env=env)


def spawn_batch(nproc: int, argv: list[str]) -> int:
    """:func:`spawn_local` for a batch command: the batch's own exit status (0, 2 or 1), not torchrun's."""
    fd, name = tempfile.mkstemp(prefix="foundation-batch-status-", suffix=".txt")
    os.close(fd)
    status_file = Path(name)
    try:
        code = spawn_local(nproc, argv, env={**os.environ, STATUS_ENV: str(status_file)})
        with contextlib.suppress(OSError, ValueError):
            written = int(status_file.read_text().strip() or -1)
            if code == EXIT_DONE and written == EXIT_SOME_SKIPPED:
                return EXIT_SOME_SKIPPED
        return code
    finally:
        status_file.unlink(missing_ok=True)


def worker_status(status: int, *, is_main: bool) -> int:
    """What a worker of :func:`spawn_batch` exits with: 0 for "some skipped" (the main rank has written the real
    status to the status file), so torchrun does not stop the others or report a failure; else ``status``."""
    path = os.environ.get(STATUS_ENV)
    if not path:
        return status
    if is_main:
        with contextlib.suppress(OSError):
            Path(path).write_text(str(status))
    return EXIT_DONE if status == EXIT_SOME_SKIPPED else status
