"""NaN and infinite voxels are missing data, in pretraining and in ``foundation segment``: left out of the
intensity statistics, background for the network and in the label map, their share reported; a volume with
nothing else is skipped with its reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, write_nifti
from test_segment import Threshold, cube_volume, make_checkpoint, typed_meta

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.errors import DataError
from foundation_domains.medical.options import VolumeOptions
from foundation_domains.medical.segmentation.infer import Segmenter
from foundation_domains.medical.segmentation.segment import _segment_one, volume_key
from foundation_domains.medical.segmentation.transforms import MR_PERCENTILES, normalise_intensity
from foundation_domains.medical.source import VolumeSampleSource
from foundation_domains.medical.volume import BACKGROUND, load_volume

SHAPE = (24, 20, 10)
NATIVE_CT = VolumeOptions(spacing=None)


def with_holes(data: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as float32 with the first ``fraction`` of its rows (first axis) NaN, a few of them +/-inf."""
    out = data.astype(np.float32)
    rows = int(round(fraction * out.shape[0]))
    out[:rows] = np.nan
    if rows:
        out[0, 0, :2] = [np.inf, -np.inf]
    missing = np.zeros(out.shape, bool)
    missing[:rows] = True
    return out, missing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("seg-model"))


# -- pretraining -------------------------------------------------------------------------------------------------
def test_pretraining_volume_with_a_quarter_nan_is_background_there_and_reported(tmp_path, caplog):
    data, missing = with_holes(cube_volume(SHAPE, (8, 4, 2), (20, 16, 8)), 0.25)
    path = write_nifti(tmp_path / "holes.nii.gz", data, np.eye(4))
    with caplog.at_level(logging.WARNING):
        volume = load_volume(path, NATIVE_CT)
    assert volume.nonfinite_fraction == pytest.approx(0.25)
    assert "holes.nii.gz: 25.0% of the voxel values are NaN or infinite" in caplog.text
    array = volume.array[0].numpy()
    assert np.isfinite(array).all()
    assert (array[missing] == BACKGROUND).all()
    np.testing.assert_array_equal(array[~missing], ((data[~missing] > 0) * 1.0).astype(np.float32))


def test_pretraining_mr_percentiles_leave_the_missing_voxels_out(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(300, 50, SHAPE).astype(np.float32)
    data, missing = with_holes(values, 0.25)
    path = write_nifti(tmp_path / "mr.nii.gz", data, np.eye(4))
    volume = load_volume(path, VolumeOptions(spacing=None, modality="mr"))
    low, high = np.percentile(values[~missing], MR_PERCENTILES)
    expected = np.clip((values[~missing] - low) / (high - low), 0, 1)
    np.testing.assert_allclose(volume.array[0].numpy()[~missing], expected, atol=1e-5)
    assert (volume.array[0].numpy()[missing] == BACKGROUND).all()


def test_pretraining_resampled_volume_with_holes_stays_finite(tmp_path):
    data, _ = with_holes(cube_volume(SHAPE, (8, 4, 2), (20, 16, 8)), 0.25)
    path = write_nifti(tmp_path / "holes.nii.gz", data, np.diag([0.8, 0.8, 3.0, 1.0]))
    volume = load_volume(path, VolumeOptions(spacing=(1.5, 1.5, 2.0)))
    assert torch.isfinite(volume.array).all() and float(volume.array.max()) == 1.0


def test_pretraining_skips_an_all_nan_volume_by_name_and_trains_on_the_others(tmp_path, caplog):
    nan = write_nifti(tmp_path / "all_nan.nii.gz", np.full(SHAPE, np.nan, np.float32), np.eye(4))
    good = write_nifti(tmp_path / "good.nii.gz", cube_volume(SHAPE, (2, 2, 2), (9, 9, 6)), np.eye(4))
    with pytest.raises(DataError, match=r"all_nan\.nii\.gz: every voxel is NaN or infinite"):
        load_volume(nan, NATIVE_CT)
    source = VolumeSampleSource([nan, good], NATIVE_CT, size=8)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING):
        crops = [source.sample(i, g)["image"] for i in range(20)]
    assert all(torch.isfinite(c).all() and c.shape == (1, 8, 8, 8) for c in crops)
    assert caplog.text.count("all_nan.nii.gz: every voxel is NaN") == 1  # named once, never read again

    only_bad = VolumeSampleSource([nan], NATIVE_CT, size=8)
    with pytest.raises(DataError, match=r"none of the 1 volume\(s\) can be trained on: .*all_nan\.nii\.gz"):
        only_bad.sample(0, torch.Generator().manual_seed(0))


def test_pretrain_command_goes_on_without_the_all_nan_volume(tmp_path, capsys, caplog, single_thread):
    data = tmp_path / "data"
    write_nifti(data / "all_nan.nii.gz", np.full((30, 30, 20), np.nan, np.float32), np.eye(4))
    holes, _ = with_holes(np.random.default_rng(0).normal(0, 100, (24, 28, 20)), 0.25)
    write_nifti(data / "holes.nii.gz", holes, np.eye(4))
    argv = ["pretrain", "--domain", "medical", "--quiet", "--data", str(data), "--out", str(tmp_path / "run")]
    quick = ["train.steps=2", "train.batch_size=2", "train.checkpoint_every=2", "data.num_workers=0"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, *quick]) == 0
    assert "all_nan.nii.gz: every voxel is NaN" in caplog.text
    assert "holes.nii.gz: 25.0% of the voxel values are NaN" in caplog.text


# -- segment -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_segment_labels_missing_voxels_background_and_finds_the_rest(tmp_path, modality):
    """The cube is found where the volume has data; the NaN quarter is background, whatever the network says."""
    data, missing = with_holes(cube_volume(SHAPE, (8, 4, 2), (20, 16, 8)), 0.25)
    meta = typed_meta((1.5, 1.5, 1.5), modality=modality)
    src = write_nifti(tmp_path / "holes.nii.gz", data, lps_affine())
    seg = Segmenter(Threshold(), meta, "cpu").run(src)
    labels = np.asarray(seg.image.dataobj)
    assert seg.image.shape == SHAPE and (labels[missing] == 0).all()
    truth = data > 0
    dice = 2 * (labels.astype(bool) & truth).sum() / (labels.astype(bool).sum() + truth.sum())
    assert dice > 0.75
    assert seg.nonfinite_fraction == pytest.approx(0.25)
    assert seg.foreground_fraction == pytest.approx(labels.astype(bool).sum() / (~missing).sum())


def test_missing_voxels_are_left_out_of_the_mr_statistics():
    image = torch.linspace(0, 100, 1000).reshape(1, 10, 10, 10)
    missing = torch.zeros_like(image, dtype=torch.bool)
    missing[:, :3] = True
    image[missing] = 1e9  # a filled hole must not move the percentiles
    out = normalise_intensity(image, missing, typed_meta(modality="mr"))
    low, high = np.percentile(image[~missing].numpy(), MR_PERCENTILES)
    expected = np.clip((image[~missing].numpy() - low) / (high - low), 0, 1)
    np.testing.assert_allclose(out[~missing].numpy(), expected, atol=1e-6)
    assert (out[missing] == 0).all()


def test_segment_cli_quarter_nan_is_done_and_reported(tmp_path, checkpoint, capsys, caplog):
    data, missing = with_holes(np.random.default_rng(1).integers(-500, 500, SHAPE), 0.25)
    src = write_nifti(tmp_path / "ct" / "holes.nii.gz", data, lps_affine())
    out = tmp_path / "seg"
    argv = ["segment", str(src), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == EXIT_DONE
    assert "holes.nii.gz: 25.0% of the voxels are NaN or infinite" in caplog.text
    result = json.loads(capsys.readouterr().out)
    assert result["volumes"][0]["nonfinite_fraction"] == pytest.approx(0.25)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"][0]["nonfinite_fraction"] == pytest.approx(0.25)
    assert "foreground_fraction" in summary["written"][0]
    labels = np.asarray(nib.load(out / "holes_seg.nii.gz").dataobj)
    assert (labels[missing] == 0).all()


def test_segment_cli_skips_an_all_nan_volume_with_its_reason(tmp_path, checkpoint, capsys):
    ct = tmp_path / "ct"
    write_nifti(ct / "all_nan.nii.gz", np.full(SHAPE, np.nan, np.float32), lps_affine())
    out = tmp_path / "seg"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]
    assert main(["segment", str(ct / "all_nan.nii.gz"), *argv]) == EXIT_NOTHING_DONE
    summary = json.loads((out / "summary.json").read_text())
    assert "every voxel is NaN or infinite" in summary["skipped"][0]["reason"]
    assert not (out / "all_nan_seg.nii.gz").exists()

    good = np.random.default_rng(0).integers(-500, 500, SHAPE).astype(np.int16)
    write_nifti(ct / "good.nii.gz", good, np.eye(4))
    capsys.readouterr()
    assert main(["segment", str(ct), *argv]) == EXIT_SOME_SKIPPED
    result = json.loads(capsys.readouterr().out)
    skipped = [Path(s["input"]).name for s in result["skipped_inputs"]]
    assert result["done"] == 1 and skipped == ["all_nan.nii.gz"]


def test_an_all_background_map_of_a_volume_with_signal_is_reported(tmp_path, caplog):
    """Soft tissue (0 HU: 0.41 after the window) under a threshold of 0.5 gives nothing: said, not hidden.
    A volume of air gives nothing too, and that is no surprise."""
    segmenter = Segmenter(Threshold(), typed_meta(spacing=None), "cpu")
    tissue = write_nifti(tmp_path / "tissue.nii.gz", np.zeros(SHAPE, np.int16), np.eye(4))
    air = write_nifti(tmp_path / "air.nii.gz", np.full(SHAPE, -1000, np.int16), np.eye(4))
    with caplog.at_level(logging.WARNING):
        entry = _segment_one(segmenter, tissue, tmp_path / "tissue_seg.nii.gz", volume_key(segmenter, tissue))
    assert entry["foreground_fraction"] == 0.0
    assert "tissue.nii.gz: the label map is all background although the volume is not" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        entry = _segment_one(segmenter, air, tmp_path / "air_seg.nii.gz", volume_key(segmenter, air))
    assert entry["foreground_fraction"] == 0.0 and "all background" not in caplog.text
