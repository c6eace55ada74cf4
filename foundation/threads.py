"""CPU thread pools sized to the CPUs this process may use, so a run does not collapse on a shared machine.

PyTorch sizes its intra-op pool to every core of the machine and OpenMP threads spin while they wait for work.
On a 2-core machine where another process (or our own data-loader workers) holds a core, the spinning threads
fight for it and a step takes several times longer than its fair share. Four rules fix that:

* the pool is sized from the CPUs the process may use (``os.sched_getaffinity``, the cgroup CPU quota), less the
  loader workers that will run beside it;
* an idle OpenMP thread spins briefly and then sleeps (``GOMP_SPINCOUNT=1000``, set in ``foundation/__init__.py``
  before torch loads), so it gives its core back within microseconds rather than milliseconds;
* the training loop, where the count is ours to choose, tries every CPU against that planned count on its own
  steps and keeps the faster, again whenever steps slow down (``foundation/thread_tuner.py``);
* loader workers run one torch thread and one OpenCV thread each.

``--threads N`` or ``FOUNDATION_THREADS=N`` sets the intra-op pool (no tuning); ``FOUNDATION_THREADS=off`` leaves
every pool and OpenMP's waiting as the libraries set them (for those who tune ``OMP_*`` themselves).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "FOUNDATION_THREADS"
OFF = "off"
_OURS = "FOUNDATION_SIZED_OMP"  # set when OMP_NUM_THREADS is our automatic choice rather than the user's


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None without a limit."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, path = line.partition("::") if line.startswith("0::") else ("", "", "")
            if hierarchy == "0":
                candidates.append(root / path.lstrip("/") / "cpu.max")
    except OSError:
        pass
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def requested_threads(value: str | None = None) -> int | None | str:
    """The user's choice: an int, ``"off"``, or None (size automatically). ``value`` defaults to the environment:
    ``FOUNDATION_THREADS``, else a user's own ``OMP_NUM_THREADS``."""
    if value is None:
        users_omp = "" if os.environ.get(_OURS) else os.environ.get("OMP_NUM_THREADS", "")
        value = os.environ.get(ENV) or users_omp
    raw = str(value).strip().lower()
    if raw in ("", "auto"):
        return None
    if raw == OFF:
        return OFF
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{ENV}={raw!r} (or --threads): give a number of threads >= 1, 'auto' or 'off'")
    return n


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads the main process runs, and why."""

    intra_op: int | None  # None: left as torch set it (FOUNDATION_THREADS=off)
    cpus: int
    loader_workers: int
    reason: str


def plan_threads(
    loader_workers: int, *, cpus: int | None = None, requested: int | None | str = None
) -> ThreadPlan:
    """Each local rank gets its share of the CPUs, less one per loader worker, at least one; the user's number
    wins."""
    cpus = available_cpus() if cpus is None else cpus
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cpus = max(1, cpus // local_ranks)
    if requested == OFF:
        return ThreadPlan(None, cpus, loader_workers, f"{ENV}=off")
    if isinstance(requested, int):
        return ThreadPlan(requested, cpus, loader_workers, "requested")
    return ThreadPlan(max(1, cpus - max(0, loader_workers)), cpus, loader_workers, "auto")


def configure_threads(loader_workers: int = 0) -> ThreadPlan:
    """Size torch's intra-op pool (and OpenCV's, which loader workers inherit) before a command's heavy work."""
    plan = plan_threads(loader_workers, requested=requested_threads())
    if plan.intra_op is None:
        return plan
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(plan.intra_op)
    else:  # torch reads it when it loads; a command that never needs torch does not pay for importing it
        os.environ["OMP_NUM_THREADS"] = str(plan.intra_op)
        os.environ[_OURS] = "1"  # our sizing, not the user's request (torchrun's workers inherit both)
    if loader_workers > 0 or "cv2" in sys.modules:
        _set_opencv_threads(1 if loader_workers > 0 else plan.intra_op)
    log.debug(
        "threads: %d intra-op (%s; %d CPUs, %d loader workers)",
        plan.intra_op,
        plan.reason,
        plan.cpus,
        loader_workers,
    )
    return plan


def worker_threads() -> None:
    """In a loader worker: one torch thread; OpenCV's count was set to 1 by the parent before the fork."""
    if requested_threads() == OFF:
        return
    import torch

    torch.set_num_threads(1)


def _set_opencv_threads(n: int) -> None:
    # Set in the parent before workers fork: calling cv2.setNumThreads in a forked child whose parent already
    # ran OpenCV's pool can deadlock.
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(n)
