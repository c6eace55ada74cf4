"""A CSV naming the slides to process (CLAM's ``process_list``), resolved against the slides found.

The first of the columns ``slide_id``, ``slide`` or ``path`` names each slide: a file name (``a.svs``), a stem
(``a``), a path relative to the data folder (``case1/a.svs``) or an absolute path. A ``process`` column, as in
CLAM's ``process_list_autogen.csv``, leaves out the rows where it is 0 (or FALSE; another value is an error).
Names that match no slide, or more than one, are reported, never guessed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import DataError
from foundation_domains.pathology.slide_refs import SlideRef, slide_name

COLUMNS = ("slide_id", "slide", "path")
# values of the process column (CLAM's 0/1, a spreadsheet's booleans); an empty cell processes the slide
PROCESS = {"1": True, "1.0": True, "true": True, "": True, "0": False, "0.0": False, "false": False}


@dataclass(frozen=True)
class SlideChoice:
    """The slides a CSV chose (in the order found) and the names it gave that match none (with the reason)."""

    chosen: tuple[SlideRef, ...]
    missing: tuple[dict[str, str], ...]


def read_slides_csv(path: str | Path) -> list[str]:
    """The slide names of a slide-list CSV (rows with ``process`` 0 left out). Cells beyond the header's columns
    (a spreadsheet's trailing commas) are ignored; a short row's missing cells are empty.

    Raises:
        DataError: naming the file: unreadable, no name column, an empty name (with its line), or no row.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader]  # line numbers as an editor shows them
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"slide list {str(path)!r} cannot be read: {e}") from e
    column = next((c for c in COLUMNS if c in fields), None)
    if column is None:
        hint = " (an empty file)" if not fields else " (the first line must name the columns)"
        raise DataError(f"{path}: a slide list needs a column {' or '.join(COLUMNS)}, got {fields}{hint}")
    names = []
    for line, row in rows:
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}  # None: extra cells
        process = row.get("process", "").lower()
        if process not in PROCESS:
            raise DataError(f"{path}:{line}: process {row['process']!r} is not 1 or 0 (or empty: process it)")
        if not PROCESS[process]:
            continue
        if not row[column]:
            raise DataError(f"{path}:{line}: empty {column!r}")
        names.append(row[column])
    if not names:
        raise DataError(f"{path}: the slide list names no slide to process")
    return list(dict.fromkeys(names))


def _keys(slide: SlideRef, root: Path | None) -> list[str]:
    name = slide_name(slide)
    local = isinstance(slide, Path)
    keys = [str(slide), name, name if local and slide.is_dir() else Path(name).stem]
    if local and root is not None and root.is_dir() and root in slide.parents:
        with_root = slide.relative_to(root)
        keys += [with_root.as_posix(), with_root.with_suffix("").as_posix()]
    return keys


def choose_slides(names: list[str], slides: list[SlideRef], root: Path | None) -> SlideChoice:
    """The slides of ``slides`` (found under ``root``) that ``names`` name, by absolute path, path relative to
    ``root``, file name or stem."""
    index: dict[str, list[Path]] = {}
    for slide in slides:
        for key in dict.fromkeys(_keys(slide, root)):
            index.setdefault(key, []).append(slide)
    chosen: set[SlideRef] = set()
    missing = []
    for name in names:
        hits = index.get(Path(name).as_posix()) or index.get(name) or []
        if not hits and Path(name).is_absolute():
            hits = [s for s in slides if isinstance(s, Path) and s.resolve() == Path(name).resolve()]
        if len(hits) == 1:
            chosen.add(hits[0])
        elif not hits:
            where = f" under {root}" if root is not None else ""
            reason = f"{name!r} of the slide list is not a slide found{where}"
            missing.append({"slide": name, "reason": reason})
        else:
            listed = ", ".join(str(h) for h in hits[:3])
            reason = f"{name!r} of the slide list names several slides ({listed})"
            missing.append({"slide": name, "reason": reason})
    return SlideChoice(tuple(s for s in slides if s in chosen), tuple(missing))


def select_slides(csv_path: str | Path, slides: list[SlideRef], root: Path | None) -> SlideChoice:
    """The slides ``csv_path`` names among ``slides``.

    Raises:
        DataError: the CSV is broken, or names none of the slides (the first missing name shown).
    """
    choice = choose_slides(read_slides_csv(csv_path), slides, root)
    if not choice.chosen:
        first = choice.missing[0]["reason"] if choice.missing else ""
        raise DataError(f"{csv_path}: names none of the {len(slides)} slide(s) found ({first})")
    return choice
