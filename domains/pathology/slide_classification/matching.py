"""Which slides have both a label and a feature file; the others are listed with why, and skipped."""

from __future__ import annotations

from dataclasses import dataclass

from foundation_domains.pathology.slide_classification.bags import Bag, FeatureFolder
from foundation_domains.pathology.slide_classification.labels import LabelTable, SlideLabel


@dataclass(frozen=True)
class Matched:
    rows: list[SlideLabel]  # labelled slides with a usable bag, in the CSV's order
    bags: dict[str, Bag]
    skipped: list[dict[str, str]]  # {"slide", "reason"} (and "file" for feature files)


def match(table: LabelTable, folder: FeatureFolder, known_labels: list[str] | None = None) -> Matched:
    """Pair rows and bags; with ``known_labels`` (a trained model's classes) rows of other labels are skipped."""
    unusable = {s["slide"] for s in folder.skipped}
    skipped = list(folder.skipped)
    rows = []
    for row in table.rows:
        if row.slide_id in unusable:
            continue  # already listed with its file's reason
        if row.slide_id not in folder.bags:
            skipped.append(
                {"slide": row.slide_id, "reason": f"no feature file {row.slide_id}.h5 in the folder"}
            )
        elif known_labels is not None and row.label not in known_labels:
            reason = f"label {row.label!r} is not one the model knows ({', '.join(known_labels)})"
            skipped.append({"slide": row.slide_id, "reason": reason})
        else:
            rows.append(row)
    labelled = {r.slide_id for r in table.rows}
    for slide, bag in folder.bags.items():
        if slide not in labelled:
            reason = f"{bag.path}: no row for {slide!r} in {table.path}"
            skipped.append({"slide": slide, "file": str(bag.path), "reason": reason})
    return Matched(rows, {r.slide_id: folder.bags[r.slide_id] for r in rows}, skipped)
