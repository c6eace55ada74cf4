"""What a batch did with each of its items, merged over ranks, and the one ``summary.json`` format.

Every batch command writes the same summary (``SUMMARY_FORMAT`` 1)::

    {"summary_format": 1, "command": "segment", "out": "seg/", "ranks": [0, 1], "world_size": 2,
     "exit_status": 2, "counts": {"items": 3, "done": 2, "written": 1, "existing": 1, "skipped": 1},
     "written":  [{"item": "a.nii.gz", "out": "seg/a_seg.nii.gz", ...facts of the command}],
     "existing": [{"item": "b.nii.gz", "out": "seg/b_seg.nii.gz", ...}],
     "skipped":  [{"item": "c.nii.gz", "reason": "c.nii.gz: not a NIfTI file", ...}],
     "stopped": null, "facts": {...facts of the whole batch}}

``written``: outputs made now; ``existing``: complete outputs of ours found from an earlier run (counted as
done, not recomputed); ``skipped``: items not done, each with its reason. ``stopped`` is the reason the batch
stopped early (a full disk), else null. Entries keep the command's own keys too (``slide``, ``input``,
``scene``, ``tiles``, ...), so scripts written for the older per-command summaries keep finding them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from foundation.batch.status import exit_status

SUMMARY_FORMAT = 1
WRITTEN, EXISTING, SKIPPED = "written", "existing", "skipped"


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """One item's outcome: ``item`` names the input as the user gave it (a path or URL), ``index`` its place in
    the input order (None for inputs that gave no item, e.g. a missing path), ``facts`` the command's own."""

    item: str
    status: str  # WRITTEN, EXISTING or SKIPPED
    out: str | None = None
    reason: str | None = None
    index: int | None = None
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"item": self.item}
        if self.out is not None:
            entry["out"] = self.out
        if self.reason is not None:
            entry["reason"] = self.reason
        return {**entry, **{k: v for k, v in self.facts.items() if k not in entry}}


@dataclasses.dataclass
class BatchReport:
    """The outcomes of one rank (or, merged, of every rank) in the order they happened."""

    results: list[ItemResult] = dataclasses.field(default_factory=list)
    ranks: tuple[int, ...] = (0,)
    stopped: str | None = None  # why the batch stopped before its last item (a full disk)

    def of(self, status: str) -> list[ItemResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> int:
        """Items whose output is on disk: written now or complete from an earlier run."""
        return sum(r.status in (WRITTEN, EXISTING) for r in self.results)

    @property
    def skipped(self) -> list[ItemResult]:
        return self.of(SKIPPED)

    @property
    def exit_status(self) -> int:
        return exit_status(self.done, len(self.skipped))

    def counts(self) -> dict[str, int]:
        n_written, n_existing = len(self.of(WRITTEN)), len(self.of(EXISTING))
        return {
            "items": len(self.results),
            "done": n_written + n_existing,
            "written": n_written,
            "existing": n_existing,
            "skipped": len(self.skipped),
        }

    def summary(
        self, command: str, out: str, world_size: int, facts: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The ``summary.json`` of this report (see the module docstring)."""
        return {
            "summary_format": SUMMARY_FORMAT,
            "command": command,
            "out": out,
            "ranks": list(self.ranks),
            "world_size": world_size,
            "exit_status": self.exit_status,
            "counts": self.counts(),
            **{status: [r.to_json() for r in self.of(status)] for status in (WRITTEN, EXISTING, SKIPPED)},
            "stopped": self.stopped,
            "facts": dict(facts or {}),
        }


def merge_reports(parts: Iterable[BatchReport]) -> BatchReport:
    """One report of every rank's: results in input order (inputs that gave no item first), the first reason
    any rank stopped for."""
    parts = list(parts)
    results = [r for part in parts for r in part.results]
    results.sort(key=lambda r: (r.index is not None, r.index or 0))  # stable: a rank's own order is kept
    ranks = tuple(sorted(rank for part in parts for rank in part.ranks))
    stopped = next((p.stopped for p in parts if p.stopped), None)
    return BatchReport(results, ranks, stopped)
