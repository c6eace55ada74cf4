"""One loop for every batch-inference command (MONAI's one-inferer contract, for whole inputs): the command
says how to make one item's output; the runner shares the items out by rank, shows progress, counts complete
outputs of ours as done, skips a broken item with its reason and finishes the rest, merges the ranks' reports
into one ``summary.json`` and gives one exit status.

A command gives:

- its items (:class:`Item`: the input, its output path, its place in the input order); item ``i`` goes to rank
  ``i % world_size``, and a stream of items is never held as a list;
- its :class:`Steps`: ``existing(item)`` (the facts of a complete output of ours, counted as done and not
  recomputed; None when it must be made; raise to skip, e.g. a file there that is not ours, or one of ours made
  otherwise without ``--overwrite``), ``run(item, started)`` (write the output atomically, typically through
  :func:`foundation.outputs.write_verified`: a temporary name, verified, renamed; return its facts) and
  optionally ``start(item)``, begun one item ahead so reading the next input overlaps the current one;
- its :class:`BatchSpec`: which errors skip an item (the rest propagate and stop the command) and whether a
  full disk stops the batch (nothing later could be written either: the items not started are listed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, Generic, TypeVar

from foundation.batch.launch import worker_status
from foundation.batch.report import EXISTING, SKIPPED, WRITTEN, BatchReport, ItemResult, merge_reports
from foundation.batch.status import EXIT_NOTHING_DONE
from foundation.batch.summary import SUMMARY, rank_summary_name, write_summary
from foundation.errors import DataError, FoundationError, OutputError

log = logging.getLogger(__name__)
S = TypeVar("S")  # what an item reads (a path, a URL, a slide reference)
H = TypeVar("H")  # an item begun ahead of its turn (a started reader)


@dataclasses.dataclass(frozen=True)
class Item(Generic[S]):
    """One input: ``index`` in the input order (it picks the rank), ``name`` as reported, ``out`` its output."""

    index: int
    name: str
    source: S
    out: Path | None = None


def _none(item: Item) -> dict[str, Any] | None:
    return None


@dataclasses.dataclass(frozen=True)
class Steps(Generic[S, H]):
    """How a command makes one item's output (see the module docstring)."""

    run: Callable[[Item[S], H], dict[str, Any]]
    existing: Callable[[Item[S]], dict[str, Any] | None] = _none
    start: Callable[[Item[S]], H] | None = None
    close: Callable[[H], None] | None = None


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a command's batch is called and how it treats failures."""

    command: str  # as typed: "embed", "segment", "canopy-height"
    unit: str = "item"  # an item in messages: "slide", "volume", "scene"
    skip_errors: tuple[type[BaseException], ...] = (DataError, OutputError)
    stop_on_disk_full: bool = False
    reason: Callable[[BaseException], str] = str
    progress: bool = True
    # the command's own keys in every summary entry (e.g. ``{"slide": ...}``, kept from its older summaries)
    entry_keys: Callable[[Item], dict[str, Any]] = lambda item: {}


def is_disk_full(error: BaseException) -> bool:
    """An output failed for lack of space (:func:`foundation.outputs.failure_reason` says so in its words)."""
    return isinstance(error, OutputError) and "no space left on device" in str(error)


def my_items(items: Iterable[Item[S]], rank: int, world_size: int) -> Iterator[Item[S]]:
    """This rank's share: item ``i`` goes to rank ``i % world_size`` (streamed)."""
    return (item for item in items if item.index % world_size == rank)


def _share_size(items: Iterable[Item], rank: int, world_size: int) -> int | None:
    if not isinstance(items, Sized):
        return None
    return sum(1 for item in items if item.index % world_size == rank)  # type: ignore[attr-defined]


class _Run(Generic[S, H]):
    """One rank's pass over its items (the loop of :func:`run_items`)."""

    def __init__(self, steps: Steps[S, H], spec: BatchSpec, report: BatchReport) -> None:
        self.steps, self.spec, self.report = steps, spec, report

    def add(
        self, item: Item, status: str, reason: str | None = None, facts: dict[str, Any] | None = None
    ) -> None:
        out = str(item.out) if item.out is not None and status != SKIPPED else None
        facts = {**self.spec.entry_keys(item), **(facts or {})}
        self.report.results.append(ItemResult(item.name, status, out, reason, item.index, facts))

    def skip(self, item: Item, error: BaseException) -> None:
        reason = self.spec.reason(error)
        log.warning("skipping %s: %s", item.name, reason)
        self.add(item, SKIPPED, reason)

    def pending(self, items: Iterator[Item[S]], bar: Any) -> Iterator[tuple[Item[S], Any]]:
        """The items to make, each begun (or the error that skips it when its turn comes); complete outputs and
        refused ones are recorded on the way."""
        for item in items:
            try:
                facts = self.steps.existing(item)
            except self.spec.skip_errors as e:
                self.skip(item, e)
                bar.update(1)
                continue
            if facts is not None:
                self.add(item, EXISTING, facts=facts)
                bar.update(1)
                continue
            yield item, self.begin(item)

    def begin(self, item: Item[S]) -> Any:
        if self.steps.start is None:
            return item
        try:
            return self.steps.start(item)
        except self.spec.skip_errors as e:
            return _Failed(e)

    def close(self, started: Any) -> None:
        if self.steps.close is not None and not isinstance(started, _Failed | Item):
            self.steps.close(started)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


def run_items(
    items: Iterable[Item[S]],
    steps: Steps[S, H],
    spec: BatchSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    report: BatchReport | None = None,
    total: int | None = None,
) -> BatchReport:
    """Make this rank's items in order, the next one begun while one runs; a broken item is skipped with its
    reason, a full disk stops the rest when ``spec.stop_on_disk_full`` (they are listed as not started). Errors
    not in ``spec.skip_errors`` propagate (after the begun items are closed). ``total``: this rank's item count
    for the progress bar when ``items`` is a stream (a sized collection is counted).

    Returns:
        This rank's report (``report``, when given, is extended: e.g. with inputs that gave no item).
    """
    from tqdm import tqdm

    report = report if report is not None else BatchReport(ranks=(rank,))
    run = _Run(steps, spec, report)
    total = total if total is not None else _share_size(items, rank, world_size)
    show = spec.progress and rank == 0
    bar = tqdm(total=total, desc=spec.command, unit=spec.unit, disable=not show, dynamic_ncols=True)
    mine = my_items(items, rank, world_size)
    queue = run.pending(mine, bar)
    current, upcoming = None, next(queue, None)
    try:
        while upcoming is not None:
            (item, current), upcoming = upcoming, None
            upcoming = next(queue, None)  # read-ahead: the next item begins while this one runs
            try:
                if isinstance(current, _Failed):
                    raise current.error
                facts = steps.run(item, current)
            except spec.skip_errors as e:
                run.skip(item, e)
                if spec.stop_on_disk_full and is_disk_full(e):
                    _stop(run, e, upcoming, mine)
                    return report
                continue
            finally:
                bar.update(1)
                run.close(current)
                current = None
            run.add(item, WRITTEN, facts=facts)
    finally:  # stopped or interrupted: close what was begun (closing twice is harmless)
        bar.close()
        for started in (current, upcoming[1] if upcoming is not None else None):
            if started is not None:
                run.close(started)
    return report


def _stop(run: _Run, error: BaseException, upcoming: tuple[Item, Any] | None, rest: Iterator[Item]) -> None:
    """A full disk: every item not started is skipped, naming why."""
    run.report.stopped = str(error)
    later = [upcoming[0]] if upcoming is not None else []
    for item in [*later, *rest]:
        run.add(item, SKIPPED, f"not started: {error}")


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """The batch over every rank: the merged report, the exit status, the summary written (main rank) and the
    error the command ends with after printing its result (None when it ends normally)."""

    report: BatchReport
    status: int
    summary: Path | None
    error: FoundationError | None
    is_main: bool

    def exit_code(self) -> int:
        """The status to return (raise :attr:`error` first): a worker of ``--nproc`` exits 0 for "some
        skipped" (:func:`foundation.batch.launch.worker_status`)."""
        return worker_status(self.status, is_main=self.is_main)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def finish(
    report: BatchReport,
    spec: BatchSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    summary_dir: Path | None = None,
    out: str = "",
    facts: Callable[[BatchReport], dict[str, Any]] | None = None,
) -> BatchOutcome:
    """Merge the ranks' reports, write the summaries and decide how the command ends (every rank must call it).

    Each rank of several writes ``summary_rank{r}.json`` (its share, before the ranks meet), rank 0 the merged
    ``summary.json`` (``summary_dir`` None: no summary, e.g. one output file). The command ends with an error
    (exit 1) when nothing was done (a full disk's error first) or a summary cannot be written; otherwise a full
    disk that stopped the batch is logged as an error, skipped items as a warning.
    """
    from foundation.train.distributed import all_gather_objects, barrier

    facts = facts or (lambda r: {})
    summary_error: OutputError | None = None

    def write(path: Path, part: BatchReport) -> Path | None:
        nonlocal summary_error
        try:
            return write_summary(path, part.summary(spec.command, out, world_size, facts(part)))
        except OutputError as e:  # raised after the ranks have met, so none waits for this one forever
            log.error("summary not written: %s", e)
            summary_error = summary_error or e
            return None

    if summary_dir is not None and world_size > 1:
        write(summary_dir / rank_summary_name(rank), report)
    merged = merge_reports(all_gather_objects(report))
    summary = None
    if summary_dir is not None and rank == 0:
        summary = write(summary_dir / SUMMARY, merged)
    barrier()  # the merged summary is on disk before any rank ends (torchrun stops the others when one ends)
    error = _ending(merged, spec, summary_error, summary_dir, speak=rank == 0)
    status = EXIT_NOTHING_DONE if error is not None else merged.exit_status
    return BatchOutcome(merged, status, summary, error, rank == 0)


def _ending(
    merged: BatchReport,
    spec: BatchSpec,
    summary_error: OutputError | None,
    summary_dir: Path | None,
    *,
    speak: bool = True,
) -> FoundationError | None:
    """The command's error, if it ends with one; else the merged batch's stop and skips are logged (by the main
    rank only: every rank holds the same merged report)."""
    skipped = merged.skipped
    if not skipped and summary_error is None:
        return None
    where = f"see {summary_dir / SUMMARY}" if summary_dir is not None else "see the output above"
    first = skipped[0].reason if skipped else ""
    message = f"{len(skipped)} of {len(merged.results)} {spec.unit}s skipped: {where} (first: {first})"
    if merged.done == 0 and merged.stopped:
        return OutputError(merged.stopped)
    if summary_error is not None:
        return summary_error
    if merged.done == 0:
        return DataError(message)
    if speak and merged.stopped:
        log.error("stopped: %s; %d %s(s) done, listed in %s", merged.stopped, merged.done, spec.unit, where)
    if speak:
        log.warning("%s", message)
    return None
