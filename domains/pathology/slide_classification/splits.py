"""Patient-level splits: no case (patient) has slides in two splits of a fold.

``k`` folds: cases are dealt to ``k`` groups stratified by label (shuffled by the seed); fold ``i`` tests on group
``i``; of the other cases, ``val_fraction`` of each label (drawn per fold, at least one where a label has three
or more) validate (early stopping) and the rest train. A ``split`` column in the labels CSV gives one fixed fold
instead.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from foundation.errors import ConfigError
from foundation_domains.pathology.slide_classification.labels import SlideLabel


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]  # slide ids
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def _case_labels(rows: list[SlideLabel]) -> dict[str, str]:
    """Each case's label for stratification: the most frequent label of its slides (first seen on a tie)."""
    labels: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        labels[r.case_id][r.label] += 1
    return {case: counts.most_common(1)[0][0] for case, counts in labels.items()}


def _deal(cases: dict[str, str], groups: int, rng: np.random.Generator) -> dict[str, int]:
    """Each case's group, stratified: every label's cases are shuffled and dealt in turn."""
    group: dict[str, int] = {}
    offset = 0
    for label in sorted({*cases.values()}):
        members = sorted(c for c, lab in cases.items() if lab == label)
        for j, i in enumerate(rng.permutation(len(members))):
            group[members[i]] = (offset + j) % groups
        offset += len(members)  # the next label starts where this one ended: group sizes stay even
    return group


def _validation_cases(cases: dict[str, str], fraction: float, rng: np.random.Generator) -> set[str]:
    """``fraction`` of each label's cases (rounded; at least one of a label with three or more)."""
    chosen: set[str] = set()
    for label in sorted({*cases.values()}):
        members = sorted(c for c, lab in cases.items() if lab == label)
        n = round(fraction * len(members))
        n = max(n, 1) if fraction > 0 and len(members) >= 3 else n
        chosen |= {members[i] for i in rng.permutation(len(members))[:n]}
    return chosen


def kfold(rows: list[SlideLabel], folds: int, seed: int, val_fraction: float = 0.2) -> list[Fold]:
    """``folds`` patient-level folds stratified by label.

    Raises:
        ConfigError: fewer cases than folds.
    """
    cases = _case_labels(rows)
    if folds < 2:
        raise ConfigError(f"task.options.folds={folds}: k-fold needs >= 2 (or give a split column)")
    if len(cases) < folds:
        raise ConfigError(
            f"task.options.folds={folds} but the labels hold {len(cases)} case(s); use fewer folds"
        )
    group = _deal(cases, folds, np.random.default_rng(seed))
    out = []
    for k in range(folds):
        pool = {c: lab for c, lab in cases.items() if group[c] != k}
        val_cases = _validation_cases(pool, val_fraction, np.random.default_rng([seed, k]))
        test = tuple(r.slide_id for r in rows if group[r.case_id] == k)
        val = tuple(r.slide_id for r in rows if r.case_id in val_cases)
        train = tuple(r.slide_id for r in rows if group[r.case_id] != k and r.case_id not in val_cases)
        out.append(Fold(k, train, val, test))
    return out


def fixed_split(rows: list[SlideLabel]) -> list[Fold]:
    """One fold from the CSV's ``split`` column.

    Raises:
        ConfigError: a case with slides in two splits (named), or no training slide.
    """
    splits: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        splits[r.case_id].add(str(r.split))
    mixed = {case: sorted(s) for case, s in splits.items() if len(s) > 1}
    if mixed:
        named = "; ".join(f"{case!r} in {', '.join(s)}" for case, s in list(mixed.items())[:5])
        raise ConfigError(f"split column: a case's slides must share one split ({named})")
    by = {name: tuple(r.slide_id for r in rows if r.split == name) for name in ("train", "val", "test")}
    return [Fold(0, by["train"], by["val"], by["test"])]


def check_folds(folds: list[Fold], labels: dict[str, str], classes: list[str]) -> list[str]:
    """Every fold must train on every label; a label missing from a fold's test or validation split is only
    reported (its metrics then cover the labels present).

    Returns:
        Warnings, one per label absent from a fold's validation or test slides.

    Raises:
        ConfigError: a fold without a label in its training slides, naming the label, the fold and how many
            slides the label has in all.
    """
    total = Counter(labels.values())
    problems, warnings = [], []
    for fold in folds:
        if not fold.train:
            raise ConfigError(f"fold {fold.index} has no training slide")
        for name, ids in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
            present = Counter(labels[s] for s in ids)
            for c in classes:
                if present[c]:
                    continue
                where = f"label {c!r} ({total[c]} slide{'s' if total[c] != 1 else ''} in all) is not in fold {fold.index}'s {name} split"
                if name == "train":
                    problems.append(where)
                elif ids:
                    warnings.append(where)
    if problems:
        raise ConfigError(
            "; ".join(problems[:6])
            + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            + ": every fold must train on every label; give more slides of it, fewer folds (task.options.folds) "
            "or drop the label"
        )
    return warnings
