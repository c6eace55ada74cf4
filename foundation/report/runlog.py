"""A run folder's ``metrics.jsonl`` as typed series: what every report plot reads."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.errors import DataError
from foundation.train.metrics import read_records

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Series:
    """One metric over steps (only the steps that logged it, non-finite values left out)."""

    key: str
    steps: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def last(self) -> float:
        return self.values[-1]


@dataclass(frozen=True)
class RunLog:
    """The numeric metrics of a run by key, and the other records (e.g. ``collapse_warning``) as text."""

    run: Path
    series: dict[str, Series]
    events: tuple[dict[str, Any], ...]

    def get(self, *keys: str) -> list[Series]:
        """The series among ``keys`` that the run logged, in that order."""
        return [self.series[k] for k in keys if k in self.series]

    def prefixed(self, *prefixes: str) -> list[Series]:
        """Every series whose key starts with one of ``prefixes`` (sorted by key)."""
        return [s for k, s in sorted(self.series.items()) if k.startswith(prefixes)]


def read_run_log(run: Path) -> RunLog:
    """Parse ``run/metrics.jsonl``; a line cut short by a kill (or a run still writing) is skipped.

    Raises:
        DataError: ``run`` is not a folder, has no metrics file, or no numeric metric in it.
    """
    run = Path(run)
    if not run.is_dir():
        raise DataError(
            f"{run}: not a run folder (give the folder `foundation pretrain/finetune --out` wrote)"
        )
    path = run / METRICS
    if not path.is_file():
        raise DataError(f"{path}: no metrics file; is {str(run)!r} a run folder that has trained a step?")
    columns: dict[str, tuple[list[int], list[float]]] = {}
    events = []
    for _, record in read_records(path):
        if not isinstance(record.get("step"), int):
            continue
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = columns.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
            elif not isinstance(value, (int, float)):
                events.append({"step": step, key: value})
    if not columns:
        raise DataError(f"{path}: no metric in it yet; report a run once it has logged a step")
    series = {k: Series(k, tuple(s), tuple(v)) for k, (s, v) in columns.items()}
    return RunLog(run, series, tuple(events))
