"""``foundation segment``: label maps on exactly the input grid, bad inputs skipped and reported, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from med_testdata import lps_affine, oblique_affine, write_dicom_series, write_nifti
from torch import nn

from foundation.batch import EXIT_DONE, EXIT_NOTHING_DONE, EXIT_SOME_SKIPPED
from foundation.cli import main
from foundation.errors import DataError
from foundation_domains.medical.segmentation.infer import Segmenter, nearest_to_grid
from foundation_domains.medical.segmentation.meta import SegmentationMeta
from foundation_domains.medical.segmentation.segment import list_inputs, output_name

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def task_meta(spacing=(2.0, 2.0, 2.0), roi: int = 16) -> dict:
    return {
        "head": {"out_channels": 3, "feature_size": 4},
        "in_chans": 1,
        "roi_size": [roi] * 3,
        "spacing": list(spacing) if spacing is not None else None,
        "modality": "ct",
        "window": [-175.0, 250.0],
        "labels": LABELS,
        "num_classes": 3,
        "overlap": 0.25,
        "sw_batch_size": 2,
    }


def typed_meta(spacing=(2.0, 2.0, 2.0), **stored) -> SegmentationMeta:
    """The typed metadata of a model storing ``task_meta(spacing)`` updated with ``stored``."""
    return SegmentationMeta.from_dict({**task_meta(spacing), **stored}, Path("test-model.pt"))


def make_checkpoint(path: Path, spacing=(2.0, 2.0, 2.0)) -> Path:
    """A real organ-segmentation model file (random weights): vit_tiny, patch 8, ROI 16^3."""
    from foundation.models.vit import build_vit
    from foundation.tasks.checkpoint import save_task_model
    from foundation_domains.medical.segmentation.model import build_segmentation_net

    torch.manual_seed(0)
    args = {"arch": "vit_tiny", "in_chans": 1, "spatial_dims": 3, "img_size": 16, "patch_size": 8}
    meta = task_meta(spacing)
    net = build_segmentation_net(build_vit(**args), meta["head"])
    path.mkdir(parents=True, exist_ok=True)
    return save_task_model(
        path / "model.pt",
        task="organ-segmentation",
        task_meta=meta,
        backbone_args=args,
        net=net,
        config={},
        step=0,
    )


class Threshold(nn.Module):
    """Logits that make the label 1 wherever the (windowed, [0, 1]) intensity is above 0.5: a known answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5, torch.full_like(x, -1.0)], dim=1)


def cube_volume(shape, lo, hi) -> np.ndarray:
    data = np.full(shape, -1000, np.int16)
    data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1000
    return data


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("seg-model"))


def test_nearest_to_grid_inverts_a_reorientation():
    """Labels in RAS order (as the network sees them) go back to LPS voxel order exactly."""
    rng = np.random.default_rng(0)
    lps = rng.integers(0, 5, (7, 6, 5)).astype(np.uint8)
    affine = lps_affine(spacing=(0.8, 0.8, 3.0))
    ras = torch.from_numpy(lps[::-1, ::-1, :].copy())
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [6, 5]  # RAS voxel (i, j, k) is LPS voxel (6 - i, 5 - j, k)
    out = nearest_to_grid(ras, affine @ flip, affine, lps.shape)
    np.testing.assert_array_equal(out, lps)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-0.75, -0.8, 1.1, 1.0]),  # flips and scale: the separable path
        np.array([[0, 0.7, 0, 10], [-0.9, 0, 0, 5], [0, 0, 1.3, -2], [0, 0, 0, 1.0]]),  # axes swapped too
        oblique_affine(),  # the general, slab-wise path
    ],
    ids=["flipped", "swapped", "oblique"],
)
def test_nearest_to_grid_matches_a_brute_force_lookup(affine):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (30, 25, 20)).astype(np.uint8)
    labels_affine = np.diag([1.5, 1.5, 2.0, 1.0])
    labels_affine[:3, 3] = [-3.0, 2.0, 5.0]
    shape = (50, 40, 30)
    m = np.linalg.inv(labels_affine) @ affine
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    coord = ijk @ m[:3, :3].T + m[:3, 3]
    inside = ((coord > -1) & (coord < labels.shape)).all(1)
    idx = np.clip(np.round(coord), 0, np.array(labels.shape) - 1).astype(int)
    expected = np.where(inside, labels[idx[:, 0], idx[:, 1], idx[:, 2]], 0).reshape(shape)
    out = nearest_to_grid(torch.from_numpy(labels), labels_affine, affine, shape)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "affine",
    [lps_affine(spacing=(0.8, 0.8, 3.0)), oblique_affine(), np.diag([1.7, 0.6, 2.2, 1.0])],
    ids=["lps", "oblique", "anisotropic"],
)
def test_labels_land_on_the_input_grid_where_the_structure_is(tmp_path, affine):
    """A bright off-centre cube is found again at the same world position, on the input's shape and affine,
    through reorientation, resampling to 1.5 mm and back."""
    shape, lo, hi = (40, 34, 16), (6, 20, 3), (20, 32, 9)
    image = cube_volume(shape, lo, hi)
    meta = typed_meta(spacing=(1.5, 1.5, 1.5))
    seg = Segmenter(Threshold(), meta, "cpu")
    src = write_nifti(tmp_path / "cube.nii.gz", image, affine)
    out = seg.segment(src)
    assert out.shape == shape
    np.testing.assert_allclose(out.affine, nib.load(src).affine, atol=1e-6)
    labels = np.asarray(out.dataobj)
    truth = image > 0
    dice = 2 * (labels.astype(bool) & truth).sum() / (labels.astype(bool).sum() + truth.sum())
    assert dice > 0.75
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    moved = np.linalg.norm(world_centroid(labels > 0, affine) - world_centroid(truth, affine))
    assert moved < spacing.max()


def test_native_spacing_is_exact(tmp_path):
    """No resampling (spacing None): the label map is the threshold of the input, voxel for voxel."""
    image = cube_volume((12, 10, 7), (2, 3, 1), (8, 9, 4))
    src = write_nifti(tmp_path / "v.nii.gz", image, lps_affine())
    out = Segmenter(Threshold(), typed_meta(spacing=None), "cpu").segment(src)
    np.testing.assert_array_equal(np.asarray(out.dataobj), (image > 0).astype(np.uint8))


def test_volume_smaller_than_the_roi_is_padded(tmp_path, checkpoint):
    src = write_nifti(tmp_path / "tiny.nii.gz", np.zeros((5, 4, 3), np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    out = Segmenter.from_checkpoint(checkpoint).segment(src)
    assert out.shape == (5, 4, 3) and out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def test_four_d_input_is_refused_naming_the_file(tmp_path, checkpoint):
    src = write_nifti(tmp_path / "dwi.nii.gz", np.zeros((6, 6, 6, 3), np.float32), np.eye(4))
    with pytest.raises(DataError, match=r"dwi\.nii\.gz.*expects a 3D volume"):
        Segmenter.from_checkpoint(checkpoint).segment(src)


def test_output_names_and_clashes(tmp_path, capsys):
    assert output_name(Path("a/ct_01.nii.gz")) == "ct_01_seg.nii.gz"
    assert output_name(Path("a/series7")) == "series7_seg.nii.gz"
    for sub in ("a", "b"):
        write_nifti(tmp_path / sub / "ct.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    args = [str(tmp_path), "--checkpoint", "x", "--out", str(tmp_path / "out")]
    assert main(["segment", *args]) == EXIT_NOTHING_DONE  # refused before the checkpoint is even read
    assert "would both be written as ct_seg.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batch_skips_and_reports_bad_inputs(tmp_path, checkpoint, capsys, caplog):
    """Good volumes (NIfTI, DICOM series) are written; a corrupt file, a 4D file, a DICOM folder with a missing
    slice or mixed series, and a text file are skipped by name; exit 2; no temporary files; a rerun keeps them."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_nifti(data / "good.nii.gz", rng.integers(-500, 500, (20, 18, 9)).astype(np.int16), lps_affine())
    write_nifti(data / "four_d.nii.gz", np.zeros((8, 8, 8, 2), np.float32), lps_affine())
    (data / "broken.nii.gz").write_bytes(b"not a nifti")
    slices = rng.integers(0, 2000, (12, 12, 5)).astype(np.uint16)
    write_dicom_series(data / "series_ok", slices)
    write_dicom_series(data / "series_gap", slices, skip=(2,))
    write_dicom_series(data / "series_mixed", slices[..., :2])
    for f in write_dicom_series(tmp_path / "other", slices[..., :2], origin=(0.0, 0.0, 50.0)).iterdir():
        f.rename(data / "series_mixed" / f"B{f.name}")  # a second series in the same folder
    notes = tmp_path / "notes.txt"
    notes.write_text("not a volume")
    out = tmp_path / "seg"

    code = main(
        [
            "segment",
            str(data),
            str(notes),
            "--checkpoint",
            str(checkpoint.parent),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == EXIT_SOME_SKIPPED
    assert "5 of 7 inputs skipped" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    skipped = {Path(s["input"]).name: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"broken.nii.gz", "four_d.nii.gz", "series_gap", "series_mixed", "notes.txt"}
    assert "not a readable NIfTI" in skipped["broken.nii.gz"]
    assert "missing or duplicate slices" in skipped["series_gap"]
    assert "mixes 2 DICOM series" in skipped["series_mixed"]
    assert sorted(p.name for p in out.iterdir()) == [
        "good_seg.nii.gz",
        "series_ok_seg.nii.gz",
        "summary.json",
    ]
    good = nib.load(out / "good_seg.nii.gz")
    assert good.shape == (20, 18, 9)
    np.testing.assert_allclose(good.affine, lps_affine(), atol=1e-6)
    series = nib.load(out / "series_ok_seg.nii.gz")
    assert series.shape == (12, 12, 5)  # DICOM rows x cols x slices, read by our reader

    capsys.readouterr()
    code = main(
        ["segment", str(data / "good.nii.gz"), "--checkpoint", str(checkpoint), "--out", str(out), "--quiet"]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == EXIT_DONE and result["existing"] == 1 and result["written"] == 0 and result["done"] == 1


def test_list_inputs_reports_a_folder_with_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    volumes, bad = list_inputs([str(tmp_path / "empty"), str(tmp_path / "missing.nii.gz")])
    assert volumes == []
    assert [Path(b["input"]).name for b in bad] == ["empty", "missing.nii.gz"]
