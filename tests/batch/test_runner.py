"""The batch runner every batch command uses: sharding by rank, read-ahead, existing outputs counted as done,
skip-and-report, a full disk stopping the rest, one summary merged over ranks, one exit rule."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.batch.launch import STATUS_ENV, worker_status
from foundation.batch.report import EXISTING, SKIPPED, WRITTEN, merge_reports
from foundation.batch.runner import BatchSpec, Item, Steps, finish, my_items, run_items
from foundation.batch.summary import check_summaries, is_our_summary
from foundation.errors import DataError, OutputError
from foundation.outputs import output_error, write_verified
from foundation.precision import autocast_dtype, resolve_precision

SPEC = BatchSpec("test", "thing", progress=False, entry_keys=lambda item: {"thing": item.name})


def _items(tmp_path: Path, n: int) -> list[Item[str]]:
    return [Item(i, f"in{i}", f"in{i}", tmp_path / f"out{i}.txt") for i in range(n)]


def _write(item: Item[str], _: object) -> dict:
    """An output written the way every command writes: temporary name, verified, renamed."""
    if item.source == "in2":
        raise DataError(f"{item.source}: broken")
    write_verified(item.out, lambda tmp: tmp.write_text(item.source), lambda tmp: tmp.read_text())
    return {"size": len(item.source)}


def test_item_i_goes_to_rank_i_mod_world_size(tmp_path: Path) -> None:
    items = _items(tmp_path, 7)
    assert [it.index for it in my_items(items, 1, 3)] == [1, 4]
    assert [it.index for it in my_items(iter(items), 0, 3)] == [0, 3, 6]  # a stream, never listed


def test_a_broken_item_is_skipped_with_its_reason_and_the_rest_finish(tmp_path: Path) -> None:
    report = run_items(_items(tmp_path, 4), Steps(run=_write), SPEC)
    assert [r.status for r in report.results] == [WRITTEN, WRITTEN, SKIPPED, WRITTEN]
    assert report.results[2].reason == "in2: broken" and report.results[2].facts == {"thing": "in2"}
    assert report.results[0].facts == {"thing": "in0", "size": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out0.txt", "out1.txt", "out3.txt"]
    assert report.exit_status == EXIT_SOME_SKIPPED


def test_existing_outputs_count_as_done_without_recomputation(tmp_path: Path) -> None:
    ran: list[str] = []

    def existing(item: Item[str]) -> dict | None:
        if item.source == "in1":
            raise OutputError(f"{item.out} exists and is not ours")  # refused: skipped, left alone
        return {} if item.out.exists() else None

    def run(item: Item[str], started: object) -> dict:
        ran.append(item.name)
        return {}

    (tmp_path / "out0.txt").write_text("made before")
    report = run_items(
        _items(tmp_path, 2) + [_items(tmp_path, 3)[2]], Steps(run=run, existing=existing), SPEC
    )
    assert [r.status for r in report.results] == [EXISTING, SKIPPED, WRITTEN] and ran == ["in2"]
    assert report.done == 2 and report.exit_status == EXIT_SOME_SKIPPED


def test_read_ahead_begins_the_next_item_and_closes_every_begun_one(tmp_path: Path) -> None:
    events: list[str] = []

    def start(item: Item[str]) -> str:
        events.append(f"start {item.name}")
        if item.name == "in1":
            raise DataError("in1: unreadable")  # reported when its turn comes
        return item.name

    def run(item: Item[str], started: str) -> dict:
        events.append(f"run {started}")
        return {}

    steps = Steps(run=run, start=start, close=lambda h: events.append(f"close {h}"))
    report = run_items(_items(tmp_path, 3), steps, SPEC)
    assert events[:3] == ["start in0", "start in1", "run in0"]  # in1 begun while in0 runs
    assert {e for e in events if e.startswith("close")} == {"close in0", "close in2"}
    assert report.results[1].reason == "in1: unreadable"


def test_a_full_disk_stops_the_batch_and_lists_what_was_not_started(tmp_path: Path) -> None:
    def run(item: Item[str], _: object) -> dict:
        if item.source == "in1":
            raise output_error(OSError(errno.ENOSPC, "No space left on device"), item.out)
        return {}

    spec = BatchSpec("test", "thing", progress=False, stop_on_disk_full=True)
    report = run_items(_items(tmp_path, 4), Steps(run=run), spec)
    assert [r.status for r in report.results] == [WRITTEN, SKIPPED, SKIPPED, SKIPPED]
    assert report.stopped == f"{tmp_path / 'out1.txt'}: cannot write (no space left on device)"
    assert report.results[3].reason.startswith("not started: ")
    # without stop_on_disk_full (segment, canopy-height) the next items are tried
    report = run_items(_items(tmp_path, 4), Steps(run=run), SPEC)
    assert [r.status for r in report.results] == [WRITTEN, SKIPPED, WRITTEN, WRITTEN]


def test_other_errors_stop_the_command(tmp_path: Path) -> None:
    def run(item: Item[str], _: object) -> dict:
        raise KeyError("a bug, not a broken input")

    with pytest.raises(KeyError):
        run_items(_items(tmp_path, 2), Steps(run=run), SPEC)


def test_reports_merge_over_ranks_in_input_order_and_the_summary_says_it_all(tmp_path: Path) -> None:
    parts = [run_items(_items(tmp_path, 5), Steps(run=_write), SPEC, rank=r, world_size=2) for r in (0, 1)]
    for r, part in enumerate(parts):
        part.ranks = (r,)
    merged = merge_reports(reversed(parts))  # the order ranks answer in does not matter
    assert [r.item for r in merged.results] == [f"in{i}" for i in range(5)] and merged.ranks == (0, 1)
    summary = merged.summary("test", "OUT", 2, {"total": 1})
    assert summary["counts"] == {"items": 5, "done": 4, "written": 4, "existing": 0, "skipped": 1}
    assert summary["skipped"] == [{"item": "in2", "reason": "in2: broken", "thing": "in2"}]
    assert summary["written"][0] == {
        "item": "in0",
        "out": str(tmp_path / "out0.txt"),
        "thing": "in0",
        "size": 3,
    }
    assert (summary["exit_status"], summary["ranks"], summary["facts"]) == (
        EXIT_SOME_SKIPPED,
        [0, 1],
        {"total": 1},
    )
    assert summary["stopped"] is None and summary["summary_format"] == 1 and summary["command"] == "test"


def test_finish_writes_the_summaries_and_gives_one_exit_status(tmp_path: Path, monkeypatch, caplog) -> None:
    import foundation.train.distributed as distributed

    report = run_items(_items(tmp_path, 3), Steps(run=_write), SPEC, rank=1, world_size=2)
    other = run_items(_items(tmp_path, 3), Steps(run=_write), SPEC, rank=0, world_size=2)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda part: [other, report])
    outcome = finish(report, SPEC, rank=1, world_size=2, summary_dir=tmp_path, out=str(tmp_path))
    assert outcome.status == EXIT_SOME_SKIPPED and outcome.error is None and not outcome.is_main
    assert (tmp_path / "summary_rank1.json").is_file() and not (tmp_path / "summary.json").exists()
    outcome = finish(other, SPEC, rank=0, world_size=2, summary_dir=tmp_path, out=str(tmp_path))
    merged = json.loads((tmp_path / "summary.json").read_text())
    assert merged["counts"]["done"] == 2 and merged["counts"]["skipped"] == 1
    assert outcome.summary == tmp_path / "summary.json"
    assert "1 of 3 things skipped: see " + str(tmp_path / "summary.json") in caplog.text


def test_nothing_done_ends_with_one_error(tmp_path: Path) -> None:
    report = run_items([_items(tmp_path, 3)[2]], Steps(run=_write), SPEC)
    outcome = finish(report, SPEC, summary_dir=tmp_path, out=str(tmp_path))
    assert outcome.status == EXIT_NOTHING_DONE and isinstance(outcome.error, DataError)
    assert "1 of 1 things skipped" in str(outcome.error) and "in2: broken" in str(outcome.error)
    with pytest.raises(DataError):
        outcome.raise_error()
    assert finish(run_items(_items(tmp_path, 2), Steps(run=_write), SPEC), SPEC).status == EXIT_DONE


def test_a_summary_that_is_not_ours_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"my": "notes"}')
    with pytest.raises(OutputError, match="is not a summary of ours"):
        check_summaries(tmp_path, "test")
    (tmp_path / "summary.json").write_text('{"summary_format": 1, "command": "other"}')
    assert not is_our_summary(tmp_path / "summary.json", "test")  # another command's
    (tmp_path / "summary.json").write_text('{"old_key": []}')
    check_summaries(tmp_path, "test", legacy=lambda data: "old_key" in data)  # an older one of ours


def test_a_spawned_worker_exits_0_for_some_skipped_and_the_main_rank_tells_the_parent(
    tmp_path: Path, monkeypatch
) -> None:
    assert worker_status(EXIT_SOME_SKIPPED, is_main=True) == EXIT_SOME_SKIPPED  # not spawned by us
    status_file = tmp_path / "status.txt"
    monkeypatch.setenv(STATUS_ENV, str(status_file))
    assert worker_status(EXIT_SOME_SKIPPED, is_main=False) == EXIT_DONE and not status_file.exists()
    assert worker_status(EXIT_SOME_SKIPPED, is_main=True) == EXIT_DONE
    assert status_file.read_text() == str(EXIT_SOME_SKIPPED)
    assert worker_status(EXIT_NOTHING_DONE, is_main=True) == EXIT_NOTHING_DONE


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu() -> None:
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32" and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp16", "cpu") is torch.float16
    with pytest.raises(Exception, match="--precision 'fp8' is not one of"):
        resolve_precision("fp8", "cpu")
