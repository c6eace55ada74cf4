"""The labels CSV: ``slide_id,label`` and optional ``case_id`` (the patient) and ``split`` (train/val/test).

A pathologist's label belongs to a slide or a patient; ``case_id`` keeps a patient's slides together in one split
(slides of one patient in train and test would leak). Without it every slide is its own case.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import ConfigError

REQUIRED = ("slide_id", "label")
OPTIONAL = ("case_id", "split")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SlideLabel:
    """One row: ``case_id`` is the slide's own id when the CSV has no ``case_id`` column."""

    slide_id: str
    label: str
    case_id: str
    split: str | None = None


@dataclass(frozen=True)
class LabelTable:
    path: Path
    rows: tuple[SlideLabel, ...]
    has_split: bool

    @property
    def classes(self) -> list[str]:
        return sort_labels({r.label for r in self.rows})

    def by_slide(self) -> dict[str, SlideLabel]:
        return {r.slide_id: r for r in self.rows}


def sort_labels(labels: set[str]) -> list[str]:
    """Class order: numeric labels by value (``2`` before ``10``), others alphabetically."""
    if all(_is_int(v) for v in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def read_labels(path: str | Path) -> LabelTable:
    """Read and check the labels CSV.

    Raises:
        ConfigError: missing file or columns (named, with the ones found), an empty id or label, a split value
            other than train/val/test, or duplicated slide ids (each named with its lines).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--labels {str(path)!r} is not a file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise ConfigError(
                    f"{path}: missing column(s) {', '.join(missing)}; found {header or 'no header'} "
                    f"(needed: {', '.join(REQUIRED)}; optional: {', '.join(OPTIONAL)})"
                )
            raw = [
                ({(k or "").strip(): (v or "").strip() for k, v in row.items()}, n + 2)
                for n, row in enumerate(reader)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: cannot read the labels CSV ({e})") from e
    has_case, has_split = "case_id" in header, "split" in header
    rows = []
    for row, line in raw:
        if not any(row.values()):
            continue  # a blank line
        slide, label = row["slide_id"], row["label"]
        if not slide or not label:
            raise ConfigError(f"{path}, line {line}: empty {'slide_id' if not slide else 'label'}")
        split = (row.get("split") or None) if has_split else None
        if has_split and split not in SPLITS:
            raise ConfigError(f"{path}, line {line}: split {split!r} is not one of {list(SPLITS)}")
        case = (row.get("case_id") or slide) if has_case else slide
        rows.append(SlideLabel(slide, label, case, split))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    _refuse_duplicates(path, [(r.slide_id, line) for r, (_, line) in zip(rows, _non_blank(raw), strict=True)])
    return LabelTable(path, tuple(rows), has_split)


def _non_blank(raw: list[tuple[dict[str, str], int]]) -> list[tuple[dict[str, str], int]]:
    return [(row, line) for row, line in raw if any(row.values())]


def _refuse_duplicates(path: Path, ids: list[tuple[str, int]]) -> None:
    counts = Counter(slide for slide, _ in ids)
    repeated = [s for s, n in counts.items() if n > 1]
    if repeated:
        where = "; ".join(
            f"{s!r} on lines {', '.join(str(line) for slide, line in ids if slide == s)}"
            for s in repeated[:5]
        )
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        raise ConfigError(f"{path}: duplicated slide_id: {where}{more}; each slide takes one row")
