"""``foundation segment`` calls a label map done only when it was made from this very input with this very model:
each map of ours carries a key (the input's path, size and mtime, the weights fingerprint and the settings) in a
NIfTI1 extension that other readers ignore. A ``summary.json`` that is not ours is refused, never replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, write_nifti
from test_segment import make_checkpoint

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE
from foundation.cli import main
from foundation_domains.medical.segmentation.segment import label_map_key

SHAPE = (24, 24, 12)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "segmodel")


def ct(path: Path, seed: int) -> Path:
    hu = np.random.default_rng(seed).integers(-900, 900, SHAPE).astype(np.int16)
    return write_nifti(path, hu, lps_affine())


def segment(volume, checkpoint, out, capsys, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    args = ["segment", str(volume), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *extra]
    code = main(args)
    printed = capsys.readouterr()
    return code, json.loads(printed.out) if printed.out.strip() else {"stderr": printed.err}


def skip_reason(result: dict) -> str:
    assert result["skipped"] == 1, result
    return result["skipped_inputs"][0]["reason"]


def test_a_summary_json_that_is_not_ours_is_refused_before_any_work(tmp_path, checkpoint, capsys):
    out = tmp_path / "userseg"
    out.mkdir()
    (out / "summary.json").write_text('{"my": 1}')
    code, result = segment(ct(tmp_path / "ctA" / "ct.nii.gz", 0), checkpoint, out, capsys)
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert code == EXIT_NOTHING_DONE
    assert len(errors) == 1 and str(out / "summary.json") in errors[0] and "not a summary" in errors[0]
    assert (out / "summary.json").read_text() == '{"my": 1}' and sorted(os.listdir(out)) == ["summary.json"]


def test_a_summary_of_ours_is_replaced(tmp_path, checkpoint, capsys):
    out = tmp_path / "seg"
    volume = ct(tmp_path / "ctA" / "ct.nii.gz", 0)
    assert segment(volume, checkpoint, out, capsys)[0] == EXIT_DONE
    assert segment(volume, checkpoint, out, capsys, "--overwrite")[0] == EXIT_DONE
    assert json.loads((out / "summary.json").read_text())["written"][0]["input"] == str(volume.resolve())


def test_another_volume_of_the_same_name_is_not_taken_as_done(tmp_path, checkpoint, capsys):
    out = tmp_path / "labels"
    a, b = ct(tmp_path / "ctA" / "ct.nii.gz", 0), ct(tmp_path / "ctB" / "ct.nii.gz", 1)
    assert segment(a, checkpoint, out, capsys)[0] == EXIT_DONE
    made_from_a = (out / "ct_seg.nii.gz").read_bytes()

    code, result = segment(b, checkpoint, out, capsys)
    assert code == EXIT_NOTHING_DONE and result["existing"] == 0
    assert "made from another input or model; pass --overwrite" in skip_reason(result)
    assert (out / "ct_seg.nii.gz").read_bytes() == made_from_a

    code, result = segment(b, checkpoint, out, capsys, "--overwrite")
    assert code == EXIT_DONE and result["written"] == 1
    assert label_map_key(out / "ct_seg.nii.gz")["input"]["path"] == str(b.resolve())
    code, result = segment(b, checkpoint, out, capsys)
    assert code == EXIT_DONE and result["existing"] == 1 and result["written"] == 0


def test_an_edited_input_is_not_taken_as_done(tmp_path, checkpoint, capsys):
    out = tmp_path / "labels"
    volume = ct(tmp_path / "ct.nii.gz", 0)
    assert segment(volume, checkpoint, out, capsys)[0] == EXIT_DONE
    stat = volume.stat()
    os.utime(volume, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    code, result = segment(volume, checkpoint, out, capsys)
    assert code == EXIT_NOTHING_DONE and "made from another input or model" in skip_reason(result)


def test_a_model_retrained_at_the_same_path_or_other_settings_are_not_taken_as_done(
    tmp_path, checkpoint, capsys
):
    out = tmp_path / "labels"
    volume = ct(tmp_path / "ct.nii.gz", 0)
    assert segment(volume, checkpoint, out, capsys)[0] == EXIT_DONE
    first_key = label_map_key(out / "ct_seg.nii.gz")

    code, result = segment(volume, checkpoint, out, capsys, "--overlap", "0.5")
    assert code == EXIT_NOTHING_DONE and "made from another input or model" in skip_reason(result)
    code, result = segment(volume, checkpoint, out, capsys, "--sw-batch-size", "3")  # speed, not labels
    assert code == EXIT_DONE and result["existing"] == 1

    state = torch.load(checkpoint, weights_only=True)
    name = next(k for k, v in state["net"].items() if v.is_floating_point())
    state["net"][name] = state["net"][name] + 0.01  # "retrained", saved over the same file
    torch.save(state, checkpoint)
    code, result = segment(volume, checkpoint, out, capsys)
    assert code == EXIT_NOTHING_DONE and "made from another input or model" in skip_reason(result)
    assert segment(volume, checkpoint, out, capsys, "--overwrite")[0] == EXIT_DONE
    second_key = label_map_key(out / "ct_seg.nii.gz")
    assert second_key["input"] == first_key["input"]
    assert second_key["model"]["weights"] != first_key["model"]["weights"]


def test_the_key_leaves_nibabel_and_monai_reading_the_labels_as_before(tmp_path, checkpoint, capsys):
    from monai.transforms import LoadImage

    from foundation_domains.medical.segmentation.infer import Segmenter

    out = tmp_path / "labels"
    volume = ct(tmp_path / "ct.nii.gz", 0)
    assert segment(volume, checkpoint, out, capsys)[0] == EXIT_DONE
    expected = Segmenter.from_checkpoint(checkpoint, overlap=None).segment(volume)  # no key: what we had
    written = nib.load(out / "ct_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(expected.dataobj))
    np.testing.assert_allclose(written.affine, expected.affine)
    key = label_map_key(out / "ct_seg.nii.gz")
    assert key["input"]["size"] == volume.stat().st_size and len(key["model"]["weights"]) == 16
    loaded = LoadImage(image_only=True)(str(out / "ct_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected.dataobj))
