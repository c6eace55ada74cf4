"""Organ-segmentation evaluation pictures: each case's organ slice, oriented and scored, and the PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from med_testdata import lps_affine, three_class_seg_meta, write_nifti
from PIL import Image

from foundation.errors import OutputError
from foundation.plotting import is_our_png
from foundation_domains.medical.segmentation.plots import case_slice, check_plots_folder, write_plots
from foundation_domains.medical.segmentation.task import DiceEvaluator

META = three_class_seg_meta()


def test_case_slice_through_the_organs() -> None:
    label = torch.zeros(1, 4, 5, 10, dtype=torch.long)
    label[0, 3, 4, 6:9] = 1  # right-most X, anterior-most Y, slices 6..8
    pred = label[0].clone()
    pred[0, 0, 7] = 1  # one false positive voxel on the organ's middle slice
    case = case_slice("c", torch.rand(1, 4, 5, 10), label, pred, {0: "bg", 1: "organ", 2: "absent"})
    assert case.z == 7 and case.depth == 10 and case.image.shape == (5, 4)
    assert case.label[0, 0] == 1 and case.label.sum() == 1  # anterior top row, patient's right on the left
    assert case.dice == {"organ": pytest.approx(2 * 3 / 7)}  # "absent" is in neither map


def test_plots_of_an_evaluation(tmp_path: Path) -> None:
    labels = np.zeros((10, 12, 6), np.uint8)
    labels[3:7, 4:9, 1:4] = 1
    hu = np.where(labels == 1, 250, -175).astype(np.int16)
    pairs = [
        {
            "image": str(write_nifti(tmp_path / f"case{k}.nii.gz", hu, lps_affine())),
            "label": str(write_nifti(tmp_path / f"case{k}_label.nii.gz", labels, lps_affine())),
        }
        for k in range(2)
    ]
    names = {0: "background", 1: "organ", 2: "absent"}
    cases = []

    def oracle(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([1 - x, x, torch.full_like(x, -1.0)], 1) * 10

    scores = DiceEvaluator(pairs, META)(
        oracle,
        torch.device("cpu"),
        lambda i, v, c: cases.append(case_slice(f"case{i}", v["image"], v["label"], c, names)),
    )
    assert [c.dice for c in cases] == [{"organ": 1.0}, {"organ": 1.0}] and scores["dice/organ"] == 1.0
    assert int(cases[0].label.sum()) == 4 * 5  # the organ's middle slice, 4 x 5 voxels
    folder = tmp_path / "plots"
    check_plots_folder(folder, False, [Path(p["image"]) for p in pairs])
    written = write_plots(folder, scores, cases, META, overwrite=False)
    assert [Path(p).name for p in written] == ["dice.png", "case0_overlay.png", "case1_overlay.png"]
    for p in written:
        assert is_our_png(Path(p))
        with Image.open(p) as im:
            assert im.width > 300 and len(np.unique(np.asarray(im.convert("L")))) > 10
    with pytest.raises(OutputError, match="already holds"):
        check_plots_folder(folder, False, [])
    check_plots_folder(folder, True, [])
    with pytest.raises(OutputError, match="is .or holds. the input"):
        check_plots_folder(tmp_path, True, [Path(pairs[0]["image"])])
