"""``foundation report RUN``: ``RUN/report.html`` (self-contained) and ``RUN/report/*.png`` (the same plots).

The PNG folder is built under a temporary name and renamed when complete; the page is written to a temporary
file, read back and parsed, then renamed over the old one: a reader never sees half a page. Existing outputs
are replaced only with ``--overwrite``, and a ``report.html`` that is not ours never.
"""

from __future__ import annotations

import argparse
import datetime
import logging
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from foundation.errors import OutputError
from foundation.outputs import building_dir, check_output_dir, read_marker, write_verified
from foundation.report import sections as sec
from foundation.report.html import GENERATOR, render_page
from foundation.report.runlog import read_run_log
from foundation.train.distributed import resolve_device

log = logging.getLogger(__name__)

KIND = "report"
PAGE = "report.html"


def is_our_page(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:2000]
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">' in head


def check_page_target(path: Path, overwrite: bool) -> None:
    """Refuse a page that exists unless it is ours and ``overwrite``.

    Raises:
        OutputError: names the file and what to do.
    """
    if path.is_dir() or (path.exists() and not is_our_page(path)):
        raise OutputError(f"{path} exists and is not a report of ours; nothing was changed. Move it away")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it (atomically)")


def _check_page(path: Path) -> None:
    """Read back and parse: a short write or a cut page fails here, before the rename."""
    text = path.read_text()
    HTMLParser().feed(text)
    if not text.rstrip().endswith("</html>"):
        raise OutputError(f"{path}: written page is incomplete")


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Write the report of the run folder ``args.run``; returns its JSON summary.

    Raises:
        DataError: not a run folder or no metrics in it. OutputError: an existing output may not be replaced.
    """
    run = Path(args.run)
    runlog = read_run_log(run)
    page, pngs = run / PAGE, run / KIND
    check_page_target(page, args.overwrite)
    check_output_dir(pngs, KIND, overwrite=args.overwrite, flag="report folder")
    marker = read_marker(run) or {}
    pretraining = (
        marker.get("command", "finetune" if (run / "model.pt").exists() else "pretrain") == "pretrain"
    )
    crops, pca = sec.crops_and_pca(run, pretraining, resolve_device(args.device))
    sections = [
        sec.losses(runlog), sec.schedules(runlog), sec.throughput(runlog), sec.knn(runlog),
        sec.collapse(runlog), sec.validation(runlog), crops, pca, sec.run_pictures(run, pngs),
        sec.last_values(runlog), sec.config(run), sec.environment(),
    ]  # fmt: skip
    steps = max(s.steps[-1] for s in runlog.series.values())
    facts = [
        ("run folder", str(run.resolve())),
        ("command", str(marker.get("command", "unknown"))),
        ("domain", str(marker.get("domain", "unknown"))),
        ("objective / task", str(marker.get("ssl_method") or marker.get("task") or "unknown")),
        ("last logged step", str(steps)),
        ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    html = render_page(f"Run report: {run.resolve().name}", facts, sections)
    written = [p for s in sections for p in s.pictures if s.id != "pictures"]
    with building_dir(pngs, KIND, overwrite=args.overwrite) as tmp:
        for picture in written:
            (tmp / picture.name).write_bytes(picture.png)
        write_verified(page, lambda t: t.write_text(html), _check_page, overwrite=True)
    log.info("report: %s (and %d PNGs in %s)", page, len(written), pngs)
    return {
        "report": str(page),
        "pngs": [str(pngs / p.name) for p in written],
        "sections": [s.id for s in sections],
        "empty_sections": [s.id for s in sections if not s.pictures and not s.table and s.pre is None],
    }
