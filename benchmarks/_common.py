"""Shared helpers for benchmarks: interleaved timing so machine noise hits ours and the baseline alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (A B A B ...) after ``warmup`` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
