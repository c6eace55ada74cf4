"""Slide classification inputs: the labels CSV, patient-level folds, the features folder, bags and the MIL head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from slide_bags import write_bag

from foundation.errors import ConfigError, DataError
from foundation_domains.pathology.slide_classification.bags import read_bag, scan_features
from foundation_domains.pathology.slide_classification.data import BagDataset, TrainSlide, collate_bags
from foundation_domains.pathology.slide_classification.labels import SlideLabel, read_labels
from foundation_domains.pathology.slide_classification.model import HeadConfig, MILHead
from foundation_domains.pathology.slide_classification.splits import check_folds, fixed_split, kfold


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_labels_csv_columns_and_duplicates_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing column\(s\) label; found \['slide_id', 'diagnosis'\]"):
        read_labels(_csv(tmp_path, "slide_id,diagnosis\na,1\n"))
    with pytest.raises(ConfigError, match=r"duplicated slide_id: 'b' on lines 3, 5"):
        read_labels(_csv(tmp_path, "slide_id,label\na,x\nb,y\nc,x\nb,x\n"))
    with pytest.raises(ConfigError, match=r"line 3: split 'tset' is not one of"):
        read_labels(_csv(tmp_path, "slide_id,label,split\na,x,train\nb,y,tset\n"))
    table = read_labels(_csv(tmp_path, "slide_id,label,case_id\na,10,p1\nb,2,p1\n\nc,2,p2\n"))
    assert table.classes == ["2", "10"] and [r.case_id for r in table.rows] == ["p1", "p1", "p2"]
    assert (
        read_labels(_csv(tmp_path, "slide_id,label\na,x\n")).rows[0].case_id == "a"
    )  # no case_id: the slide


def _rows(n_cases: int, slides_per_case: int, labels: str = "ab") -> list[SlideLabel]:
    return [
        SlideLabel(f"s{c}_{j}", labels[c % len(labels)], f"p{c}")
        for c in range(n_cases)
        for j in range(slides_per_case)
    ]


def test_kfold_is_patient_level_stratified_and_seeded() -> None:
    rows = _rows(20, 3)
    folds = kfold(rows, 5, seed=0)
    case = {r.slide_id: r.case_id for r in rows}
    label = {r.slide_id: r.label for r in rows}
    tests = [s for f in folds for s in f.test]
    assert sorted(tests) == sorted(case)  # every slide is tested exactly once
    for f in folds:
        parts = [{case[s] for s in part} for part in (f.train, f.val, f.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # no patient in two
        assert sorted(label[s] for s in f.test).count("a") == 6  # 2 cases of each label, 3 slides each
    assert kfold(rows, 5, seed=0) == folds and kfold(rows, 5, seed=1) != folds
    assert check_folds(folds, label, ["a", "b"]) == []


def test_a_label_a_fold_cannot_train_on_is_named() -> None:
    rows = _rows(9, 1) + [SlideLabel("rare", "c", "p99")]
    folds = kfold(rows, 3, seed=0)
    label = {r.slide_id: r.label for r in rows}
    rare_fold = next(f.index for f in folds if "rare" in f.test)
    with pytest.raises(
        ConfigError, match=rf"label 'c' \(1 slide in all\) is not in fold {rare_fold}'s train split"
    ):
        check_folds(folds, label, ["a", "b", "c"])


def test_fixed_split_refuses_a_patient_in_two_splits() -> None:
    rows = [
        SlideLabel("a", "x", "p1", "train"),
        SlideLabel("b", "y", "p1", "test"),
        SlideLabel("c", "y", "p2", "val"),
    ]
    with pytest.raises(ConfigError, match=r"'p1' in test, train"):
        fixed_split(rows)
    rows[1] = SlideLabel("b", "y", "p3", "test")
    (fold,) = fixed_split(rows)
    assert (fold.train, fold.val, fold.test) == (("a",), ("c",), ("b",))


def test_features_folder_one_kind_and_broken_files_named(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        write_bag(feats / f"{name}.h5", rng.normal(size=(5, 8)))
    write_bag(feats / "empty.h5", np.zeros((0, 8)))
    (feats / "cut.h5").write_bytes((feats / "a.h5").read_bytes()[:1500])  # a truncated copy
    (feats / ".tmp-1-x.h5").write_bytes(b"")  # a temporary of embed: not looked at
    folder = scan_features(feats)
    assert sorted(folder.bags) == ["a", "b", "c"] and folder.dim == 8
    reasons = {s["slide"]: s["reason"] for s in folder.skipped}
    assert set(reasons) == {"empty", "cut"}
    assert "empty.h5: empty bag (0 tiles)" in reasons["empty"]
    assert "cut.h5: cannot be read" in reasons["cut"]
    write_bag(feats / "wide.h5", rng.normal(size=(5, 16)))
    with pytest.raises(DataError, match=r"different widths.*8 features.*a.h5.*16 features.*wide.h5"):
        scan_features(feats)
    (feats / "wide.h5").unlink()
    write_bag(feats / "other.h5", rng.normal(size=(5, 8)), backbone="0123456789abcdef")
    with pytest.raises(DataError, match=r"backbone '0123456789ab': other.h5"):
        scan_features(feats)


def test_read_bag_samples_rows_of_the_file(tmp_path: Path) -> None:
    x = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)
    path = write_bag(tmp_path / "a.h5", x)
    assert torch.equal(read_bag(path), torch.from_numpy(x))
    part = read_bag(path, 700, torch.Generator().manual_seed(1))
    rows = part[:, 0].long() // 4
    assert part.shape == (700, 4) and (rows.diff() > 0).all()  # distinct rows in file order
    assert torch.equal(part, torch.from_numpy(x)[rows])
    assert torch.equal(part, read_bag(path, 700, torch.Generator().manual_seed(1)))
    with pytest.raises(DataError, match="b.h5: cannot be read"):
        read_bag(tmp_path / "b.h5")


def test_padding_does_not_change_a_bag(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = MILHead(HeadConfig(in_dim=8, n_classes=3, hidden=16, attention_dim=8, dropout=0.0)).eval()
    bags = [{"features": torch.randn(n, 8), "label": 0, "fold": 0} for n in (5, 9)]
    batch = collate_bags(bags)
    out = head(batch["features"], batch["mask"])
    alone = head(bags[0]["features"][None], torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out["logits"][0], alone["logits"][0])
    assert out["attention"][0, 5:].eq(0).all() and out["attention"].sum(1).allclose(torch.ones(2))


def test_balanced_sampling_draws_labels_evenly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    slides = [
        TrainSlide(write_bag(tmp_path / f"{i}.h5", rng.normal(size=(3, 4))), int(i >= 9)) for i in range(10)
    ]
    labels = [BagDataset([slides], 0, balanced=True).pick(i)[1].label for i in range(400)]
    assert 0.4 < np.mean(labels) < 0.6  # one slide of label 1 in ten, drawn half of the time
    plain = [BagDataset([slides], 0).pick(i)[1] for i in range(20)]
    assert sorted(s.path.name for s in plain[:10]) == sorted(
        s.path.name for s in slides
    )  # a permutation a pass
